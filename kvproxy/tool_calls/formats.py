"""Which tool-call format a chat template speaks, from its text.

* ``hermes``: the template writes calls as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
  (Hermes 2/3, Qwen 2.5, Qwen3, Granite, MiMo-VL: llama.cpp's autoparser reads these as JSON calls).
* ``generic``: the template knows nothing of tools (Gemma 2/3, kvproxy's Gemma fallback, ChatML):
  the JSON format llama.cpp used for such templates before its autoparser (kvproxy.tool_calls.generic).
* ``qwen-xml``: ``<tool_call>`` around ``<function=...><parameter=...>`` (Qwen3.5/3.6, Qwen3-Coder,
  Nemotron Nano 3: kvproxy.tool_calls.qwen_xml), detected as llama.cpp detects it (common/chat.cpp:
  not the templates that write ``'<tool_call><function=' ~ name`` without a newline).
* ``gemma4``: ``<|tool_call>call:NAME{...}<tool_call|>`` (kvproxy.tool_calls.gemma4).
* anything else (Llama 3's JSON, Mistral's ``[TOOL_CALLS]`` ...) is refused with a 400 naming it,
  rather than parsed wrong.
"""

from __future__ import annotations

from enum import StrEnum


class ToolFormat(StrEnum):
    GENERIC = "generic"
    HERMES = "hermes"
    QWEN_XML = "qwen-xml"
    GEMMA4 = "gemma4"


class UnsupportedToolFormat(ValueError):
    """The template has a tool-call format of its own that kvproxy does not parse yet."""


def tool_format(template: str) -> ToolFormat:
    if "'<|tool_call>call:'" in template:
        return ToolFormat.GEMMA4
    if (
        "<tool_call>" in template
        and "<function=" in template
        and "<parameter=" in template
        and "'<tool_call><function=' ~ tool_call.name ~ '>'" not in template
    ):
        return ToolFormat.QWEN_XML
    if "<tool_call>" in template and "<function=" not in template:
        return ToolFormat.HERMES
    if "<tool_call>" in template:
        raise UnsupportedToolFormat("this model's XML tool-call format (<function=...> without newlines)")
    if "<|tool_call>" in template:
        raise UnsupportedToolFormat("this Gemma tool-call format (<|tool_call>)")
    if "tools" not in template and "tool_calls" not in template:
        return ToolFormat.GENERIC
    raise UnsupportedToolFormat("this chat template's own tool-call format")
