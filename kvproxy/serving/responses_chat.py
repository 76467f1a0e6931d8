"""``/v1/responses`` as a chat completion: the request translated, the answer rendered back.

One implementation for both modes: the embedded backend serves the translated request on its own
chat path, the proxy sends it to the primary's ``/v1/chat/completions``, and both render the chat
answer (or its chunks) with kvproxy.serving.responses_format. llama-server's own ``/v1/responses``
is never used: its rendering reports no logprobs (a shadowed request could not be scored), and it
leaves out what OpenAI's spec requires (``sequence_number``, ``output_index``, the response's
parameters, ``status: incomplete`` when cut). The served tokens are those of the chat completion,
so the shadow path scores a response exactly as it scores that chat completion.

Mapping (as OpenAI's own Agents SDK converts between the two APIs): ``instructions`` become the
first system message; ``function_call`` items become the ``tool_calls`` of an assistant message
(joined to the assistant message just before them); ``function_call_output`` items become
``role: tool`` messages; flat function tools ``{type, name, parameters}`` become chat's
``{type, function: {...}}``; ``max_output_tokens`` (else the default output cap) becomes
``max_tokens``; ``text.format`` becomes ``response_format``.
"""

from __future__ import annotations

from typing import Any

from kvproxy.protocol_responses import LOGPROBS_INCLUDE, ResponsesLogprob, ResponsesTopLogprob
from kvproxy.serving.output_cap import applied_cap

# Responses fields that a chat completion does not take (converted, or meaningless there)
_RESPONSES_ONLY = (
    "input",
    "instructions",
    "max_output_tokens",
    "reasoning",
    "text",
    "include",
    "stream_options",
    "top_logprobs",
    "truncation",
    "store",
    "tools",
    "tool_choice",
    "max_tool_calls",
    "background",
    "previous_response_id",
    "conversation",
    "prompt",
    "prompt_cache_retention",
    "service_tier",
)
_TEXT_PARTS = ("input_text", "output_text")


def _chat_content(content: Any) -> Any:
    """A Responses message's content as chat content parts, or None if it holds anything else."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            continue  # a refusal the client echoes back carries nothing to generate from
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            return None
    return parts


def _tool_output(output: Any) -> str | None:
    """A function's output as a tool message's text (text parts joined)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(
        isinstance(p, dict) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str)
        for p in output
    ):
        return "".join(p["text"] for p in output)
    return None


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any]) -> bool:
    """A ``function_call`` item as a tool call of the assistant message it belongs to."""
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
        return False
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
        if not last.get("content"):
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return True


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages of a Responses request (instructions first, as llama-server converts
    them), or None when it holds an item a chat completion cannot express."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        return None
    for item in given:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            if not _add_call(messages, item):
                return None
        elif kind == "function_call_output":
            output = _tool_output(item.get("output"))
            call_id = item.get("call_id")
            if output is None or not isinstance(call_id, str):
                return None
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "message":
            role, content = item.get("role"), _chat_content(item.get("content"))
            if role not in ("user", "system", "developer", "assistant") or content is None:
                return None
            messages.append({"role": role, "content": content})
        else:
            return None
    return messages


# a chat completion's parameter names as the Responses request that became it has them
_RESPONSES_PARAMS = (
    ("messages", "input"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
)


def responses_param(param: str | None) -> str | None:
    """The Responses request's name for a chat parameter an error names (a 400 must point at what
    the client sent: ``text.format.schema``, not ``response_format.json_schema.schema``)."""
    if param is None:
        return None
    for chat, responses in _RESPONSES_PARAMS:
        if param == chat or param.startswith((chat + ".", chat + "[")):
            return responses + param[len(chat) :]
    return param


def translatable(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages when the request can be served as a chat completion, else None (a 400)."""
    for stateful in ("previous_response_id", "conversation", "prompt", "background"):
        if body.get(stateful):
            return None
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) and t.get("type") == "function" for t in tools)
    ):
        return None
    return chat_messages(body)


def wants_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    include = body.get("include")
    wanted = isinstance(include, list) and LOGPROBS_INCLUDE in include
    top = body.get("top_logprobs")
    return wanted, int(top) if wanted and isinstance(top, int) and not isinstance(top, bool) else 0


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    spec = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": spec}


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def output_cap(body: dict[str, Any], default: int) -> int | None:
    """The output cap a Responses request gets: its ``max_output_tokens``, else the default output
    cap (None: no cap but the context)."""
    return applied_cap("responses", body, default)


def chat_body(body: dict[str, Any], messages: list[dict[str, Any]], default: int) -> dict[str, Any]:
    """The chat completion that serves this Responses request: ``max_tokens`` is its
    ``max_output_tokens``, else ``default`` if above 0 (else none: the chat route's own default,
    which the embedded backend clamps to the context's room)."""
    out = {k: v for k, v in body.items() if k not in _RESPONSES_ONLY}
    out["messages"] = messages
    cap = body.get("max_output_tokens")
    if cap is not None or default > 0:
        out["max_tokens"] = cap if cap is not None else default
    tools = body.get("tools")
    if tools:
        out["tools"] = [_chat_tool(t) for t in tools]
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    if not tools:
        out.pop("parallel_tool_calls", None)
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        out["response_format"] = {"type": "json_schema", "json_schema": spec}
    wanted, top = wants_logprobs(body)
    if wanted:  # llama-server reports no logprobs at all for top_logprobs 0: ask for one, strip it
        out["logprobs"] = True
        out["top_logprobs"] = max(top, 1)
    if body.get("stream"):
        out["stream_options"] = {"include_usage": True}  # the final event carries the usage
    return out


def _top(entry: dict[str, Any]) -> ResponsesTopLogprob:
    token = str(entry.get("token", ""))
    raw = entry.get("bytes")
    return ResponsesTopLogprob(
        token=token, logprob=float(entry.get("logprob", 0.0)), bytes=raw if raw else list(token.encode())
    )


def responses_logprobs(choice: dict[str, Any]) -> list[ResponsesLogprob]:
    """A chat choice's logprobs (as left for the client) in the Responses API's shape."""
    lp = choice.get("logprobs")
    entries = (lp.get("content") if isinstance(lp, dict) else None) or []
    out = []
    for e in entries:
        head = _top(e)
        tops = [_top(t) for t in e.get("top_logprobs") or []]
        out.append(ResponsesLogprob(**head.model_dump(), top_logprobs=tops))
    return out
