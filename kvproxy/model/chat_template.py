"""Turn OpenAI chat messages into the prompt text a model was trained on.

A GGUF's own ``tokenizer.chat_template`` wins. Where the GGUF has none (the bundled Gemma 3 270M is
the base model and carries no template), the model family's published turn format is used, so Gemma
sees ``<start_of_turn>user ... <end_of_turn>`` rather than a format it never saw; unknown families
fall back to ChatML, as llama-server does. Rendering uses llama-cpp-python's Jinja2 formatter
(sandboxed, with the Hugging Face template extensions).

What llama-server (``--jinja``) does around the template is done the same way, so a chat renders to
the same prompt (checked against its ``/apply-template`` for Qwen3.5 and Gemma 4,
tests/test_templates.py):

* ``enable_thinking`` is passed, true where the template has a reasoning format (kvproxy.model.reasoning);
  a request's ``chat_template_kwargs`` can turn it off;
* a leading BOS the template writes is dropped when the vocabulary adds one anyway;
* content parts reach the template as a list where it reads lists, else joined with newlines;
* an assistant message's ``reasoning_content`` reaches the template;
* a final assistant message is continued, not answered (llama-server's ``prefill_assistant``), for
  the two reasoning formats: the turn so far, its reasoning block open if it has only reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from kvproxy.model.reasoning import GEMMA4, QWEN, ReasoningFormat, reasoning_format

if TYPE_CHECKING:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# Gemma's published chat template (Gemma 2 and 3): a system message is folded into the first user
# turn; the assistant's role is called "model".
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILY_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


class ChatTemplateError(ValueError):
    """The messages do not fit the template (for example roles that do not alternate)."""


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    # the prompt's tail that the model's output continues (the generation prompt, or the turn being
    # continued): what llama-server's reasoning parser reads before the generated text
    generation_prompt: str


GEMMA4_CALL = "'<|tool_call>call:'"  # how llama.cpp tells a Gemma 4 template
GEMMA4_TURN_END = "<turn|>\n"
GEMMA4_MODEL_TURN = "<|turn>model\n"
_PROBE = ("\x00kvproxy-part-one\x00", "\x00kvproxy-part-two\x00")


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    source: str  # where it came from, shown at start-up: "gguf", "gemma3 family", "chatml fallback"
    bos_token: str
    eos_token: str
    add_bos: bool = False  # the vocabulary adds BOS when tokenizing (then a rendered one is dropped)

    @classmethod
    def for_model(
        cls,
        architecture: str,
        gguf_template: str | None,
        bos_token: str,
        eos_token: str,
        add_bos: bool = False,
    ) -> ChatTemplate:
        if gguf_template:
            return cls(gguf_template, "gguf", bos_token, eos_token, add_bos)
        if architecture in FAMILY_TEMPLATES:
            return cls(
                FAMILY_TEMPLATES[architecture],
                f"{architecture} family (the GGUF has none)",
                bos_token,
                eos_token,
                add_bos,
            )
        return cls(CHATML_TEMPLATE, "chatml fallback (the GGUF has none)", bos_token, eos_token, add_bos)

    @cached_property
    def reasoning(self) -> ReasoningFormat | None:
        """The reasoning format llama-server would parse this template's output with, if known."""
        return reasoning_format(self.template)

    @cached_property
    def _formatter(self) -> Jinja2ChatFormatter:  # compiles the template once
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # llama.cpp loads when needed

        return Jinja2ChatFormatter(template=self.template, eos_token=self.eos_token, bos_token=self.bos_token)

    @cached_property
    def _formatter_no_prompt(self) -> Jinja2ChatFormatter:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        return Jinja2ChatFormatter(
            template=self.template,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            add_generation_prompt=False,
        )

    @cached_property
    def typed_content(self) -> bool:
        """Whether the template reads a list of content parts (then it gets them as a list, as
        llama-server passes them); else the parts are joined with newlines first. Probed by
        rendering two marked parts: both must show, and no Python list repr around them."""
        probe: list[Any] = [{"role": "user", "content": [{"type": "text", "text": t} for t in _PROBE]}]
        try:
            out = self._formatter(messages=probe).prompt
        except Exception:
            return False
        return all(t in out for t in _PROBE) and "'text'" not in out

    def _content(self, content: Any) -> Any:
        if isinstance(content, list) and not self.typed_content:
            return "\n".join(str(p.get("text", "")) for p in content)
        return content

    def _render(
        self, messages: list[dict[str, Any]], generation_prompt: bool, variables: dict[str, Any]
    ) -> str:
        formatter = self._formatter if generation_prompt else self._formatter_no_prompt
        try:
            out: str = formatter(messages=messages, **variables).prompt  # type: ignore[arg-type]
        except ValueError as exc:  # raise_exception() inside the template
            raise ChatTemplateError(str(exc)) from exc
        except Exception as exc:  # a template error from jinja2 itself
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token) :]  # the tokenizer adds it (llama-server drops it too)
        return out

    def render_chat(
        self, messages: list[dict[str, Any]], *, variables: dict[str, Any] | None = None
    ) -> RenderedChat:
        """The prompt for ``messages`` and the tail of it that the model's output continues.

        ``variables``: extra template variables (a request's ``chat_template_kwargs``). As in
        llama-server, ``enable_thinking`` is true by default where the reasoning format is known;
        elsewhere it is left undefined unless given."""
        context = dict(variables or {})
        if self.reasoning is not None:
            context.setdefault("enable_thinking", True)
        msgs = [{**m, "content": self._content(m.get("content"))} for m in messages]
        fmt = self.reasoning
        if fmt is not None and msgs and msgs[-1]["role"] == "assistant":
            return self._continue(fmt, msgs, context)
        prompt = self._render(msgs, True, context)
        if GEMMA4_CALL in self.template and prompt.endswith(GEMMA4_TURN_END):
            # a model turn ending in a call leaves the template no generation prompt to add: llama.cpp
            # adds Gemma 4's (common/parsers/gemma4.cpp), so the model starts a new turn
            return RenderedChat(prompt + GEMMA4_MODEL_TURN, GEMMA4_MODEL_TURN)
        if fmt is None:
            return RenderedChat(prompt, "")
        before = self._render(msgs, False, context)
        n = 0
        while n < min(len(before), len(prompt)) and before[n] == prompt[n]:
            n += 1
        return RenderedChat(prompt, prompt[n:])

    def _continue(
        self, fmt: ReasoningFormat, msgs: list[dict[str, Any]], context: dict[str, Any]
    ) -> RenderedChat:
        """llama-server's continuation of a final assistant message (common/parsers/qwen3-coder.cpp,
        gemma4.cpp): the history without it, then the turn as far as the message goes."""
        if len(msgs) >= 2 and msgs[-2]["role"] == "assistant":
            raise ChatTemplateError("Cannot have 2 or more assistant messages at the end of the list.")
        last = msgs[-1]
        content = last.get("content") or ""
        if isinstance(content, list):
            content = "\n".join(str(p.get("text", "")) for p in content)
        reasoning = str(last.get("reasoning_content") or "")
        reasoning_only = bool(reasoning) and not content
        prompt = self._render(msgs[:-1], False, context)
        if fmt is QWEN:
            tail = fmt.assistant_prefix + "<think>\n" + reasoning
            if not reasoning_only:
                tail += "\n</think>\n\n" + content
        else:
            assert fmt is GEMMA4
            tail = (
                (fmt.assistant_prefix if prompt.endswith("<turn|>\n") else "")
                + "<|channel>thought\n"
                + reasoning
            )
            if not reasoning_only:
                tail += "<channel|>" + content
        return RenderedChat(prompt + tail, tail)

    def render(self, messages: list[dict[str, Any]], *, variables: dict[str, Any] | None = None) -> str:
        return self.render_chat(messages, variables=variables).prompt
