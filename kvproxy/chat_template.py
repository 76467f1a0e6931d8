"""Turn OpenAI chat messages into the prompt text a model was trained on.

A GGUF's own ``tokenizer.chat_template`` wins. Where the GGUF has none (the bundled Gemma 3 270M is
the base model and carries no template), the model family's published turn format is used, so Gemma
sees ``<start_of_turn>user ... <end_of_turn>`` rather than a format it never saw; unknown families
fall back to ChatML, as llama-server does. Rendering uses llama-cpp-python's Jinja2 formatter
(sandboxed, with the Hugging Face template extensions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

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
class ChatTemplate:
    template: str
    source: str  # where it came from, shown at start-up: "gguf", "gemma3 family", "chatml fallback"
    bos_token: str
    eos_token: str

    @classmethod
    def for_model(
        cls, architecture: str, gguf_template: str | None, bos_token: str, eos_token: str
    ) -> ChatTemplate:
        if gguf_template:
            return cls(gguf_template, "gguf", bos_token, eos_token)
        if architecture in FAMILY_TEMPLATES:
            return cls(
                FAMILY_TEMPLATES[architecture],
                f"{architecture} family (the GGUF has none)",
                bos_token,
                eos_token,
            )
        return cls(CHATML_TEMPLATE, "chatml fallback (the GGUF has none)", bos_token, eos_token)

    @cached_property
    def _formatter(self) -> Jinja2ChatFormatter:  # compiles the template once
        return Jinja2ChatFormatter(template=self.template, eos_token=self.eos_token, bos_token=self.bos_token)

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        except ValueError as exc:  # raise_exception() inside the template
            raise ChatTemplateError(str(exc)) from exc
        except Exception as exc:  # a template error from jinja2 itself
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
