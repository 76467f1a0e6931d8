"""Where llama-server (Jinja templates on) sees each chat message start, so a replay can cut the
prompt where it did (kvproxy.scoring.prompt_fill).

llama-server splits a chat prompt's token ids into message spans with the template's *message
delimiters* (common/chat.cpp ``common_chat_msg_delimiters::split``): at every position, the first
delimiter (in order) whose tokens match there starts a span of its role. It cuts the prompt batch at
user spans. The delimiters are never reported (``/apply-template`` returns only the prompt), so they
are found here the way llama.cpp finds them:

* templates with a dedicated parser (recognised by strings in their source, in llama.cpp's order:
  ``common_chat_try_specialized_template``) have a fixed list (common/parsers/*.cpp); some have none;
* every other template goes through llama.cpp's "differential autoparser", which renders probe
  conversations and takes the text that a user message (and an assistant message) adds before its
  content (common/chat-diff-analyzer.cpp ``detect_user_start_marker`` and
  ``detect_assistant_start_marker``, with the helpers of chat-auto-parser-helpers.cpp), then a few
  per-template patches. The renders come from the llama-server itself (kvproxy.upstream), so its own
  Jinja engine renders them; the string work is ported here, on UTF-8 bytes as llama.cpp does it.

Not ported: the autoparser trims an assistant marker at the reasoning tags its reasoning analysis
finds; the assistant marker only matters here where it matches at the very position of a user
marker (the first match wins), which these two never do when both name their role. Legacy templates
(``--no-jinja``) have no delimiters at all. tests/test_message_spans.py checks the resulting cuts
against a real llama-server's, template by template. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

USER_MSG = "U_USER_MSG Hello END_U"
USER_MSG_TWO = "V_USER_MSG Hello END_V"
ASSISTANT_MSG = "A_ASST_MSG I can help END_A"

_USER = {"role": "user", "content": USER_MSG}
_USER_TWO = {"role": "user", "content": USER_MSG_TWO}
_ASSISTANT = {"role": "assistant", "content": ASSISTANT_MSG}

# the conversations the autoparser renders (add_generation_prompt false, enable_thinking true)
PROBES: dict[str, list[dict[str, Any]]] = {
    "empty": [],
    "user": [_USER],
    "user2 assistant": [_USER_TWO, _ASSISTANT],
    "user2 assistant user": [_USER_TWO, _ASSISTANT, _USER],
    "user assistant": [_USER, _ASSISTANT],
}


@dataclass(frozen=True)
class Delimiter:
    role: str  # "user", "assistant", "system", "tool"
    text: str


Delimiters = tuple[Delimiter, ...]

# ---- templates with a dedicated parser ---------------------------------------------------------------


def _has(src: str, *needles: str) -> bool:
    return all(n in src for n in needles)


_IM = "<|im_start|>"
_COHERE_TURN = "<|START_OF_TURN_TOKEN|>"
# (name, recognises the template's source, its delimiters): common_chat_try_specialized_template's
# order; a parser that sets no delimiters has an empty list
_SPECIALIZED: tuple[tuple[str, Any, tuple[tuple[str, str], ...]], ...] = (
    (
        "Ministral 3",
        lambda s: _has(s, "[SYSTEM_PROMPT]", "[TOOL_CALLS]", "[ARGS]") and "[CALL_ID]" not in s,
        (),
    ),
    (
        "GPT-OSS",
        lambda s: "<|channel|>" in s,
        (
            ("assistant", "<|start|>assistant"),
            ("user", "<|start|>user"),
            ("system", "<|start|>developer"),
            ("system", "<|start|>system"),
            ("tool", "<|start|>functions"),
        ),
    ),
    (
        "Muse Glimmer",
        lambda s: _has(s, "<atem:function_calls>", "<|eom|>"),
        (
            ("assistant", "<|start|>assistant"),
            ("user", "<|start|>user"),
            ("system", "<|start|>system"),
            ("tool", "<|start|>tool"),
        ),
    ),
    ("Functionary v3.2", lambda s: _has(s, ">>>all", ">>>${recipient}"), ()),
    ("Kimi K2", lambda s: _has(s, "<|tool_calls_section_begin|>", "<|tool_call_begin|>"), ()),
    (
        "Kimi K3",
        lambda s: _has(s, "<|open|>", "<|close|>", "<|end_of_msg|>"),
        (
            ("assistant", '<|open|>message role="assistant"<|sep|>'),
            ("user", '<|open|>message role="user"<|sep|>'),
            ("tool", '<|open|>message role="tool"'),
            ("system", '<|open|>message role="system"'),
        ),
    ),
    (
        "Ling 3.0",
        lambda s: _has(s, "<role>ASSISTANT</role>", "<arg_key>"),
        (
            ("assistant", "<role>ASSISTANT</role>"),
            ("user", "<role>HUMAN</role>"),
            ("tool", "<role>OBSERVATION</role>"),
            ("system", "<role>SYSTEM</role>"),
        ),
    ),
    (
        "Cohere2 MoE",
        lambda s: _has(s, "<|START_TEXT|>", "<|START_ACTION|>"),
        (
            ("assistant", _COHERE_TURN + "<|CHATBOT_TOKEN|>"),
            ("user", _COHERE_TURN + "<|USER_TOKEN|>"),
            ("tool", _COHERE_TURN + "<|SYSTEM_TOKEN|><|START_TOOL_RESULT|>"),
            ("system", _COHERE_TURN + "<|SYSTEM_TOKEN|>"),
        ),
    ),
    ("LFM2", lambda s: _has(s, "<|tool_list_start|>", "<|tool_list_end|>"), ()),
    ("LFM2.5", lambda s: "List of tools: [" in s and "<|tool_list_start|>" not in s, ()),
    (
        "GigaChat V3",
        lambda s: _has(s, "<|role_sep|>", "<|message_sep|>") and "<|function_call|>" not in s,
        (),
    ),
    (
        "MiniMax-M3",
        lambda s: _has(s, "]<]minimax[>[", "<tool_call>", "<invoke name="),
        (
            ("assistant", "]~b]ai"),
            ("user", "]~b]user"),
            ("tool", "]~b]tool"),
            ("system", "]~b]developer"),
            ("system", "]~b]system"),
        ),
    ),
    (
        "DeepSeek V3.2/V4",
        lambda s: _has(s, "dsml_token", "DSML") and ("function_calls" in s or "tool_calls" in s),
        (("assistant", "<\uff5cAssistant\uff5c>"), ("user", "<\uff5cUser\uff5c>")),  # fullwidth bars
    ),
    (
        "Gemma 4",
        lambda s: "'<|tool_call>call:'" in s,
        (("user", "<|turn>user"), ("assistant", "<|turn>model")),
    ),
    (
        "MiniCPM5",
        lambda s: _has(s, "Tool usage guidelines:", '<function name="', '<param name="'),
        (
            ("assistant", _IM + "assistant"),
            ("tool", _IM + "user\n<tool_response>"),
            ("user", _IM + "user"),
            ("system", _IM + "system"),
        ),
    ),
    (
        "Qwen3-Coder",
        lambda s: (
            _has(s, "<tool_call>", "<function=", "<parameter=")
            and "'<tool_call><function=' ~ tool_call.name ~ '>'" not in s
        ),
        (
            ("assistant", _IM + "assistant"),
            ("tool", _IM + "user\n<tool_response>"),
            ("tool", _IM + "tool_response"),
            ("user", _IM + "user"),
            ("system", _IM + "system"),
        ),
    ),
)


def specialized_delimiters(src: str) -> Delimiters | None:
    """The delimiters of the dedicated parser llama.cpp picks for this template, or None when it
    picks none (then the autoparser's apply: :func:`autoparser_delimiters`)."""
    for _, recognises, delimiters in _SPECIALIZED:
        if recognises(src):
            return tuple(Delimiter(role, text) for role, text in delimiters)
    return None


# ---- the differential autoparser ----------------------------------------------------------------------

_SPACE = b" \t\n\v\f\r"  # C's isspace in the "C" locale


@dataclass(frozen=True)
class Segment:
    marker: bool  # a <...> or [...] tag, else text
    value: bytes


@dataclass(frozen=True)
class DiffSplit:
    prefix: bytes = b""
    suffix: bytes = b""
    left: bytes = b""
    right: bytes = b""


def trim(text: bytes) -> bytes:
    return text.strip(_SPACE)


def segmentize_markers(text: bytes) -> list[Segment]:
    """Text and tags (``<...>``, ``[...]``) in order (chat-auto-parser-helpers.cpp)."""
    out: list[Segment] = []
    opener = 0  # the byte that opened the tag being read, 0 outside one
    border = 0
    for pos, c in enumerate(text):
        if not opener and c in b"<[":
            if border < pos:
                out.append(Segment(False, text[border:pos]))
            border, opener = pos, c
        elif opener and c == (ord(">") if opener == ord("<") else ord("]")):
            out.append(Segment(True, text[border : pos + 1]))
            border, opener = pos + 1, 0
    if border < len(text):
        out.append(Segment(False, text[border:]))
    return out


def _common_prefix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def diff_split(left: bytes, right: bytes) -> DiffSplit:
    """What differs between two renders, segment-aware (``calculate_diff_split``, ported as is)."""
    ls, rs = segmentize_markers(left), segmentize_markers(right)
    if not ls:
        return DiffSplit(right=right)
    if not rs:
        return DiffSplit(left=left)
    l0, l1, r0, r1 = 0, len(ls) - 1, 0, len(rs) - 1  # first and last segment still in play
    prefix, suffix = b"", b""
    left_done = right_done = False
    while l0 != l1 and r0 != r1:
        advanced = False
        if ls[l0] == rs[r0]:
            prefix += ls[l0].value
            l0, r0, advanced = l0 + 1, r0 + 1, True
        if ls[l1] == rs[r1]:
            suffix = ls[l1].value + suffix
            if l0 != l1:
                l1 -= 1
            else:
                left_done = True
            if r0 != r1:
                r1 -= 1
            else:
                right_done = True
            advanced = True
        if not advanced:
            break
    if l0 == l1 and r0 != r1:
        if ls[l0] == rs[r1]:
            suffix = rs[r1].value + suffix
            r1 -= 1
            left_done = True
        elif ls[l0] == rs[r0]:
            prefix += rs[r0].value
            r0 += 1
            left_done = True
    elif r0 == r1 and l0 != l1:
        if ls[l1] == rs[r0]:
            suffix = ls[l1].value + suffix
            l1 -= 1
            right_done = True
        elif ls[l0] == rs[r0]:
            prefix += ls[l0].value
            l0 += 1
            right_done = True
    elif l0 == l1 and r0 == r1 and ls[l0] == rs[r0] and ls[l0].marker:
        prefix += rs[r0].value
        left_done = right_done = True
    text_suffix = not ls[l1].marker and not rs[r1].marker
    text_prefix = not rs[r0].marker and not ls[l0].marker
    rest_left = b"".join(s.value for s in ls[l0 : l1 if left_done else l1 + 1])
    rest_right = b"".join(s.value for s in rs[r0 : r1 if right_done else r1 + 1])
    n_suffix = _common_suffix(rest_left, rest_right) if text_suffix else 0
    n_prefix = (
        _common_prefix(rest_left[: len(rest_left) - n_suffix], rest_right[: len(rest_right) - n_suffix])
        if text_prefix
        else 0
    )
    out = DiffSplit(
        prefix + rest_left[:n_prefix],
        rest_left[len(rest_left) - n_suffix :] + suffix,
        rest_left[n_prefix : len(rest_left) - n_suffix],
        rest_right[n_prefix : len(rest_right) - n_suffix],
    )
    if not out.left and not out.right:  # no difference: all of it as the prefix
        out = DiffSplit(prefix=left)
    if not out.left and out.right and right.startswith(left):
        out = DiffSplit(prefix=left, right=right[len(left) :])  # left is a prefix of right
    return out


def _before(text: bytes, needle: bytes) -> bytes:
    """``text.substr(0, text.find(needle))``: all of it when the needle is missing."""
    i = text.find(needle)
    return text if i < 0 else text[:i]


def user_start_marker(renders: Mapping[str, str | None]) -> str:
    """``detect_user_start_marker``: the markers a user message adds before its content, skipping
    end-of-turn markers and blank text at the start. ``renders``: :data:`PROBES` rendered without a
    generation prompt (None: the template failed on that conversation)."""
    pairs = (("empty", "user"), ("user2 assistant", "user2 assistant user"))
    texts = next(
        ((renders.get(a), renders.get(b)) for a, b in pairs if None not in (renders.get(a), renders.get(b))),
        None,
    )
    if texts is None:
        return ""
    left, right = (str(t).encode() for t in texts)
    msg = diff_split(left, right).right
    asst = ASSISTANT_MSG.encode()
    if asst in msg:
        msg = msg[msg.find(asst) + len(asst) :]
    out, seen_marker = b"", False
    for seg in segmentize_markers(_before(msg, USER_MSG.encode())):
        lower = seg.value.lower()
        if seg.marker and not seen_marker and (b"end" in lower or b"close" in lower):
            continue
        if not seg.marker and not seen_marker and not trim(seg.value):
            continue
        seen_marker |= seg.marker
        out += seg.value
    return trim(out).decode(errors="replace")


def assistant_start_marker(renders: Mapping[str, str | None]) -> str:
    """``detect_assistant_start_marker`` without its reasoning-tag trim (see the module docstring)."""
    left, right = renders.get("user"), renders.get("user assistant")
    if left is None or right is None:
        return ""
    msg = diff_split(left.encode(), right.encode()).right
    return trim(_before(msg, ASSISTANT_MSG.encode())).decode(errors="replace")


# per-template patches of the autoparser's markers (chat-diff-analyzer.cpp ``workarounds``):
# (recognises the source, user marker or None, assistant marker or None)
_PATCHES: tuple[tuple[Any, str | None, str | None], ...] = (
    # Cohere Command R+; llama.cpp patches it only when its content analysis found no content start
    (
        lambda s: _has(s, "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
        None,
    ),
    (
        lambda s: _has(s, "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<TOOL_RESPONSE>"),
        "<SPECIAL_11>User",
        "<SPECIAL_11>Assistant",
    ),
    (
        lambda s: (
            "{%- set system_prompt = '<|start_header_id|>' + 'system' + '<|end_header_id|>\\n\\n'"
            " + message['content'] | trim + '\\n' + system_prompt_suffix + '<|eot_id|>' -%}" in s
        ),
        "<|start_header_id|>user<|end_header_id|>",
        "<|start_header_id|>assistant<|end_header_id|>",
    ),
    (lambda s: "<|begin|>assistant<|think|><|end|>" in s, None, "<|begin|>assistant"),
    (
        lambda s: "if not loop.last and '[BEGIN FINAL RESPONSE]' in asst_text" in s,
        "<|begin_user|>",
        "<|begin_assistant|>",
    ),
)


def autoparser_delimiters(src: str, renders: Mapping[str, str | None]) -> Delimiters:
    """The autoparser's delimiters: the assistant marker, then the user marker (when found)."""
    user, assistant = user_start_marker(renders), assistant_start_marker(renders)
    for recognises, patched_user, patched_assistant in _PATCHES:
        if recognises(src):
            user = patched_user if patched_user is not None else user
            assistant = patched_assistant if patched_assistant is not None else assistant
    return tuple(Delimiter(role, text) for role, text in (("assistant", assistant), ("user", user)) if text)


# ---- the split ------------------------------------------------------------------------------------------


def user_starts(tokens: Sequence[int], delimiters: Sequence[tuple[str, Sequence[int]]]) -> list[int]:
    """Where user spans start in a prompt's token ids (``common_chat_msg_delimiters::split``): at
    each position the first delimiter whose tokens match there gives the span's role (an empty
    one matches everywhere, as in llama.cpp). ``delimiters``: (role, token ids) in llama-server's
    order."""
    ids = list(tokens)
    delims = [(role, list(d)) for role, d in delimiters]
    out = []
    for i in range(len(ids)):
        for role, d in delims:
            if i + len(d) <= len(ids) and (not d or ids[i] == d[0]) and ids[i : i + len(d)] == d:
                if role == "user":
                    out.append(i)
                break
    return out
