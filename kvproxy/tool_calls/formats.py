"""Which tool-call format a chat template speaks, from its text.

* ``hermes``: the template writes calls as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
  (Hermes 2/3, Qwen 2.5, Qwen3, Granite, MiMo-VL: llama.cpp's autoparser reads these as JSON calls).
* ``generic``: the template knows nothing of tools (Gemma 2/3, kvproxy's Gemma fallback, ChatML):
  the JSON format llama.cpp used for such templates before its autoparser (kvproxy.tool_calls.generic).
* anything else (Qwen3.5's and Qwen3-Coder's XML parameters, Gemma 4's ``<|tool_call>``, Llama 3's
  JSON, Mistral's ``[TOOL_CALLS]`` ...) is refused with a 400 naming it, rather than parsed wrong.
"""

from __future__ import annotations

from enum import StrEnum


class ToolFormat(StrEnum):
    GENERIC = "generic"
    HERMES = "hermes"


class UnsupportedToolFormat(ValueError):
    """The template has a tool-call format of its own that kvproxy does not parse yet."""


def tool_format(template: str) -> ToolFormat:
    if "<tool_call>" in template and "<function=" not in template:
        return ToolFormat.HERMES
    if "<tool_call>" in template:
        raise UnsupportedToolFormat("this model's XML tool-call format (<function=...><parameter=...>)")
    if "<|tool_call>" in template:
        raise UnsupportedToolFormat("Gemma 4's tool-call format (<|tool_call>call:...)")
    if "tools" not in template and "tool_calls" not in template:
        return ToolFormat.GENERIC
    raise UnsupportedToolFormat("this chat template's own tool-call format")
