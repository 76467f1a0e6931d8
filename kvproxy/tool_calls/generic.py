"""llama.cpp's generic JSON tool-call format, for templates that know nothing of tools.

The pinned llama.cpp (0.3.36's) no longer has it: its autoparser finds no tool syntax in such a
template, so llama-server renders the template with ``tools`` (which it ignores) and returns plain
text, even for ``tool_choice: required`` (docs/function-calling.md). kvproxy keeps the format
llama.cpp used for these templates until its autoparser (``common_chat_params_init_generic`` with
minja's polyfills), so Gemma 3 can call tools:

* a system message says to answer in JSON and lists the tools;
* a JSON-schema grammar forces ``{"tool_call": {"name", "arguments"}}`` (``{"tool_calls": [...]}``,
  each with an ``id``, when parallel calls are allowed), or, unless a call is required,
  ``{"response": "..."}``;
* earlier calls go back into the history as that JSON, tool results as a user turn holding
  ``{"tool_response": {"tool", "content", "tool_call_id"}}`` (consecutive ones merged, so templates
  that insist on alternating roles take them).
"""

from __future__ import annotations

import json
from typing import Any

from kvproxy.tool_calls.spec import ParsedCall, ToolPlan, compact_json, parameters

INSTRUCTION = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
    "reply to the user's request"
)
TOOLS_INTRO = "You can call any of the following tools to satisfy the user's requests: "


def system_addition(plan: ToolPlan) -> str:
    """The text added to the system message (a new one if there is none)."""
    instruction = INSTRUCTION.replace("`tool_call`", "`tool_calls`") if plan.parallel else INSTRUCTION
    return instruction + "\n\n" + TOOLS_INTRO + json.dumps(list(plan.tools), indent=2, ensure_ascii=False)


def _call_schema(tool: dict[str, Any], parallel: bool) -> dict[str, Any]:
    function = tool["function"]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "const": function["name"]},
            "arguments": parameters(function),
        },
        "required": ["name", "arguments"],
    }
    if parallel:
        schema["properties"]["id"] = {"type": "string", "minLength": 4}
        schema["required"].append("id")
    return schema


def output_schema(plan: ToolPlan, response_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema every answer must match (compiled to a grammar by the caller).

    ``response_schema``: a response format's schema for the ``response`` value (else a string)."""
    calls = [_call_schema(t, plan.parallel) for t in plan.callable]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if plan.parallel:
        tool_call: dict[str, Any] = {
            "type": "object",
            "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
            "required": ["tool_calls"],
        }
    else:
        tool_call = {"type": "object", "properties": {"tool_call": one}, "required": ["tool_call"]}
    if plan.choice.forced:
        return tool_call
    response = {
        "type": "object",
        "properties": {"response": response_schema if response_schema is not None else {"type": "string"}},
        "required": ["response"],
    }
    return {"anyOf": [tool_call, response]}


def parse(text: str) -> tuple[str | None, list[ParsedCall]]:
    """The answer's content and calls. Output that is not one of the format's objects (cut short,
    say) is returned as content, unchanged."""
    try:
        data = json.loads(text)
    except ValueError:
        return text, []
    if not isinstance(data, dict):
        return text, []
    try:
        if "tool_calls" in data:
            return None, [_call(c) for c in data["tool_calls"]]
        if "tool_call" in data:
            return None, [_call(data["tool_call"], with_id=False)]
    except (KeyError, TypeError):
        return text, []
    if "response" in data:
        response = data["response"]
        return (response if isinstance(response, str) else json.dumps(response, indent=2)), []
    return text, []


def _call(call: dict[str, Any], with_id: bool = True) -> ParsedCall:
    name = call["name"]
    if not isinstance(name, str):
        raise TypeError("name")
    call_id = call.get("id") if with_id else None
    return ParsedCall(name, compact_json(call["arguments"]), call_id if isinstance(call_id, str) else "")


def history(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The messages as a template without tools can take them: calls and results as JSON text,
    the tools and the instruction in the system message (when calls are read: ``plan`` active)."""
    parallel = plan is not None and plan.parallel
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": _calls_text(message, parallel, names)})
        elif role == "tool":
            result: dict[str, Any] = {}
            call_id = message.get("tool_call_id")
            if call_id in names:
                result["tool"] = names[call_id]
            result["content"] = message.get("content")
            if call_id:
                result["tool_call_id"] = call_id
            text = json.dumps({"tool_response": result}, indent=2, ensure_ascii=False)
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_response"):
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_response": True})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_response", None)
    if plan is not None and plan.active:
        addition = system_addition(plan)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + addition}
        else:
            out.insert(0, {"role": "system", "content": addition})
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _calls_text(message: dict[str, Any], parallel: bool, names: dict[str, str]) -> str:
    calls = []
    for call in message["tool_calls"]:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except (TypeError, ValueError):
            arguments = function["arguments"]
        entry = {"name": function["name"], "arguments": arguments}
        if call.get("id"):
            names[call["id"]] = function["name"]
            entry["id"] = call["id"]
        calls.append(entry)
    obj: dict[str, Any] = (
        {"tool_calls": calls}
        if parallel or len(calls) > 1
        else {"tool_call": {k: v for k, v in calls[0].items() if k != "id"}}
    )
    content = _text(message.get("content"))
    if content:
        obj["content"] = content
    return json.dumps(obj, indent=2, ensure_ascii=False)
