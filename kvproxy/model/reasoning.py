"""A reasoning model's output split into ``reasoning_content`` and ``content``, as llama-server does.

llama-server (``--jinja``, its default ``--reasoning-format deepseek``) recognises a template family
(common/chat.cpp: ``common_chat_try_specialized_template``), renders special tokens of that family
as text (its "preserved tokens"), and parses the generation prompt's tail plus the generated text
with the family's grammar (common/parsers/qwen3-coder.cpp, gemma4.cpp). Two families are done here,
the ones kvproxy is checked against (tests/test_templates.py):

* Qwen3.5/3.6 (the Qwen3-Coder XML tool-call templates with ``<think>``): the generation prompt ends
  in ``<think>\\n``; reasoning runs to ``</think>`` (whitespace after ``<think>`` skipped, before
  ``</think>`` kept), content follows with its leading whitespace skipped.
* Gemma 4: an optional ``<|channel>thought`` ... ``<channel|>`` block (whitespace after
  ``thought`` skipped), then content as generated; several blocks are concatenated, and a stray
  ``<channel|>`` ends the parse (what follows is dropped).

Without a closing tag everything after the opening one is reasoning (llama-server parses leniently).
:class:`ReasoningSplitter` does it incrementally for streams: it holds back only text that may
still turn out to be part of a tag, so the concatenated deltas equal the one-shot split.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: str  # opens a reasoning block
    end: str  # closes it
    assistant_prefix: str  # the generation prompt's role header, which the parser skips first
    strip_content: bool  # skip whitespace before the content (Qwen's grammar has `<<` there)
    preserved: tuple[str, ...]  # special tokens rendered as text while generating (llama-server's)
    stop_on: str | None = None  # a tag that ends the parse when met in the content


QWEN = ReasoningFormat(
    "qwen3.5",
    "<think>",
    "</think>",
    "<|im_start|>assistant\n",
    strip_content=True,
    preserved=("<tool_call>", "</tool_call>", "<think>", "</think>"),
)
GEMMA4 = ReasoningFormat(
    "gemma4",
    "<|channel>thought",
    "<channel|>",
    "<|turn>model\n",
    strip_content=False,
    preserved=("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|turn>"),
    stop_on="<channel|>",
)
_CHANNEL = "<|channel>"


def reasoning_format(template: str) -> ReasoningFormat | None:
    """The family llama-server would detect in this template source, if it is one of the two."""
    if "'<|tool_call>call:'" in template:
        return GEMMA4
    qwen_coder = all(s in template for s in ("<tool_call>", "<function=", "<parameter="))
    if (
        qwen_coder
        and "'<tool_call><function=' ~ tool_call.name ~ '>'" not in template
        and "<think>" in template
    ):
        return QWEN
    return None


def _partial_suffix(text: str, *tags: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if tag.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class ReasoningSplitter:
    """Feed the generation prompt's tail first (``generation_prompt``), then the generated text."""

    fmt: ReasoningFormat
    generation_prompt: str = ""
    _buf: str = ""
    _state: str = "prefix"  # prefix, open, think_ws, think, after_ws, content, stopped
    _pending: tuple[str, str] = field(default=("", ""))
    _empty_channel: bool = False

    def __post_init__(self) -> None:
        self._pending = self.push(self.generation_prompt)

    def push(self, text: str) -> tuple[str, str]:
        """Add text; returns what is now known to be (reasoning, content)."""
        self._buf += text
        reasoning, content = self._run(final=False)
        if self._pending != ("", ""):
            reasoning, content = self._pending[0] + reasoning, self._pending[1] + content
            self._pending = ("", "")
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the output: nothing is held back any more."""
        reasoning, content = self._run(final=True)
        if self._pending != ("", ""):
            reasoning, content = self._pending[0] + reasoning, self._pending[1] + content
            self._pending = ("", "")
        return reasoning, content

    def _run(self, *, final: bool) -> tuple[str, str]:
        f = self.fmt
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            buf, state = self._buf, self._state
            if state == "stopped":
                self._buf = ""
                break
            if state == "prefix":
                if buf.startswith(f.assistant_prefix):
                    self._buf, self._state = buf[len(f.assistant_prefix) :], "open"
                elif f.assistant_prefix.startswith(buf) and not final:
                    break  # the role header may still come
                else:
                    self._state = "open"
            elif state == "open":
                if buf.startswith(f.start):
                    self._buf, self._state, self._empty_channel = buf[len(f.start) :], "think_ws", False
                elif (not buf or f.start.startswith(buf)) and not final:
                    break  # may still open a reasoning block
                elif f is GEMMA4 and buf.startswith(_CHANNEL):
                    # an empty channel is skipped, but a thought block must follow it
                    self._buf, self._empty_channel = buf[len(_CHANNEL) :], True
                elif self._empty_channel:
                    self._buf, self._state = "", "stopped"  # llama-server's parse ends here
                else:
                    self._state = "after_ws" if f.strip_content else "content"
            elif state == "think_ws":
                rest = buf.lstrip()
                self._buf = rest
                if not rest and not final:
                    break
                self._state = "think"
            elif state == "think":
                i = buf.find(f.end)
                if i >= 0:
                    reasoning.append(buf[:i])
                    self._buf = buf[i + len(f.end) :]
                    self._state = "after_ws" if f.strip_content else "content"
                else:
                    keep = 0 if final else _partial_suffix(buf, f.end)
                    reasoning.append(buf[: len(buf) - keep])
                    self._buf = buf[len(buf) - keep :]
                    break
            elif state == "after_ws":
                rest = buf.lstrip()
                self._buf = rest
                if not rest:
                    break
                self._state = "content"
            else:  # content
                if f is not GEMMA4:
                    content.append(buf)
                    self._buf = ""
                    break
                i, j = buf.find(_CHANNEL), buf.find(f.end)
                if i >= 0 and (j < 0 or i < j):
                    content.append(buf[:i])
                    self._buf, self._state = buf[i:], "open"  # another thought block may follow
                elif j >= 0:
                    content.append(buf[:j])
                    self._buf, self._state = "", "stopped"
                else:
                    keep = 0 if final else _partial_suffix(buf, _CHANNEL, f.end)
                    content.append(buf[: len(buf) - keep])
                    self._buf = buf[len(buf) - keep :]
                    break
        return "".join(reasoning), "".join(content)


def split_reasoning(fmt: ReasoningFormat, generation_prompt: str, text: str) -> tuple[str, str]:
    """The whole output at once: (reasoning_content, content)."""
    splitter = ReasoningSplitter(fmt, generation_prompt)
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.finish()
    return r1 + r2, c1 + c2
