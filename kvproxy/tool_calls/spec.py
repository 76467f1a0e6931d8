"""What a request asks of function calling, read once: the tools, the choice, parallel calls.

``tool_choice`` is OpenAI's: ``none`` (tools are described but never called), ``auto`` (the model
decides), ``required`` (at least one call, forced by grammar) or ``{"type": "function", "function":
{"name": N}}`` (a call of N, forced by grammar). A parsed call keeps its arguments as the JSON text
llama.cpp would send (compact, as nlohmann's ``dump()`` writes it).
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Literal

ChoiceMode = Literal["none", "auto", "required"]

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A call id as llama-server makes one (32 random letters and digits), with OpenAI's prefix."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def compact_json(value: Any) -> str:
    """JSON as llama.cpp's ``json::dump()`` writes it: no spaces, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode
    name: str | None = None  # a named function: mode is "required" and only this one may be called

    @property
    def forced(self) -> bool:
        return self.mode == "required"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = ""  # the model's own id, where its format carries one


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers (OpenAI's ``{"type": "function", "function": {...}}`` dicts), what
    it asks of them, and whether several calls may come in one turn."""

    tools: tuple[dict[str, Any], ...]
    choice: ToolChoice
    parallel: bool

    @property
    def callable(self) -> tuple[dict[str, Any], ...]:
        """The functions the model may call: all of them, or the named one."""
        if self.choice.name is None:
            return self.tools
        return tuple(t for t in self.tools if t["function"]["name"] == self.choice.name)

    @property
    def active(self) -> bool:
        """Whether the output is read for calls at all (``none``: plain text)."""
        return bool(self.tools) and self.choice.mode != "none"


def parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameter schema; none given means an object with any members (as llama.cpp's
    ``common_chat_tool_parameters``)."""
    params = function.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}
