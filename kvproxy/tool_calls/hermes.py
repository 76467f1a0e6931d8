"""The Hermes-style ``<tool_call>`` JSON format (Hermes 2/3, Qwen 2.5, Qwen3, Granite, MiMo-VL).

The template itself describes the tools and writes earlier calls and results, so nothing is added to
the prompt. The model writes each call as ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``,
after any text (llama.cpp's autoparser reads the same, tests/test-chat.cpp). A required or named
choice is forced by a grammar: the call's JSON schema, compiled as any schema is
(kvproxy.backends.grammar, in the child process), wrapped in the tags.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from kvproxy.tool_calls.spec import ParsedCall, ToolPlan, compact_json, parameters

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_ROOT = re.compile(r"^root ::=", re.MULTILINE)


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """One call's JSON: the name of a callable function and arguments that match its schema."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": t["function"]["name"]},
                "arguments": parameters(t["function"]),
            },
            "required": ["name", "arguments"],
        }
        for t in plan.callable
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def wrap_grammar(call_grammar: str, parallel: bool) -> str:
    """The grammar of a forced answer from the grammar of one call's JSON (its ``root`` renamed):
    one tagged call, or with parallel calls one or more."""
    body = _ROOT.sub("tool-call-json ::=", call_grammar, count=1)
    one = r'"<tool_call>\n" tool-call-json "\n</tool_call>"'
    root = f"root ::= {one}" + (rf' ( "\n" {one} )*' if parallel else "")
    return root + "\n" + body


def parse(text: str) -> tuple[str | None, list[ParsedCall]]:
    """The text before the first call as content, and the calls. A call whose JSON does not parse
    (cut short, say) leaves the whole text as content, as llama.cpp's parser would not match it."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    content = text[:start]
    calls: list[ParsedCall] = []
    decoder = json.JSONDecoder()
    pos = start
    while pos < len(text):
        rest = text[pos:]
        stripped = rest.lstrip()
        if not stripped:
            break
        if not stripped.startswith(OPEN):
            return text, []
        body_at = pos + (len(rest) - len(stripped)) + len(OPEN)
        body = text[body_at:]
        lead = len(body) - len(body.lstrip())
        try:
            obj, used = decoder.raw_decode(body.lstrip())
        except ValueError:
            return text, []
        after = body_at + lead + used
        tail = text[after:]
        close_at = tail.find(CLOSE)
        if close_at < 0 or tail[:close_at].strip() or not _is_call(obj):
            return text, []
        calls.append(ParsedCall(obj["name"], compact_json(obj["arguments"])))
        pos = after + close_at + len(CLOSE)
    return (content or None), calls


def _is_call(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj


def history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls as the template reads them: arguments as objects where they parse (llama.cpp's
    ``func_args_not_string`` workaround for templates that take object arguments)."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            fixed = []
            for call in calls:
                function = dict(call["function"])
                with contextlib.suppress(TypeError, ValueError):
                    function["arguments"] = json.loads(function["arguments"])
                fixed.append({**call, "function": function})
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out
