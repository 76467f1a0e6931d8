"""``/v1/responses`` in front of llama-server: translated to its chat route, rendered back.

llama-server serves ``/v1/responses`` by converting the request to a chat completion and rendering
the result (tools/server/server-chat.cpp). Its rendering reports no logprobs, so a shadowed request
could not be scored there, and it leaves out fields OpenAI's spec requires (``sequence_number``,
``output_index``, the response's parameters). kvproxy therefore does the same conversion itself for
every request it can express as a chat completion (messages of text and images, no tools): it calls
the primary's ``/v1/chat/completions`` (with logprobs when shadowed, exactly as for chat) and renders
the answer with the embedded backend's renderer, so both kinds of deployment answer alike.
Requests with tools, function-call items or reasoning items go to llama-server's own
``/v1/responses`` byte for byte (tools are llama-server's business) and are not shadow-scored.
"""

from __future__ import annotations

from typing import Any

from kvproxy.protocol_responses import LOGPROBS_INCLUDE, ResponsesLogprob, ResponsesTopLogprob

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
    "parallel_tool_calls",
    "max_tool_calls",
    "background",
    "previous_response_id",
    "conversation",
    "prompt",
    "prompt_cache_retention",
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


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages of a Responses request (instructions first, as llama-server converts
    them), or None when it holds what only llama-server's own ``/v1/responses`` handles."""
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
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            return None
        role, content = item.get("role"), _chat_content(item.get("content"))
        if role not in ("user", "system", "developer", "assistant") or content is None:
            return None
        messages.append({"role": role, "content": content})
    return messages


def translatable(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages when kvproxy can serve this request through the chat route, else None."""
    if body.get("tools") or body.get("tool_choice") not in (None, "none", "auto"):
        return None
    for stateful in ("previous_response_id", "conversation", "prompt", "background"):
        if body.get(stateful):
            return None  # llama-server's own route refuses these, in its words
    return chat_messages(body)


def wants_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    include = body.get("include")
    wanted = isinstance(include, list) and LOGPROBS_INCLUDE in include
    top = body.get("top_logprobs")
    return wanted, int(top) if wanted and isinstance(top, int) and not isinstance(top, bool) else 0


def chat_body(
    body: dict[str, Any], messages: list[dict[str, Any]], max_tokens_default: int
) -> dict[str, Any]:
    """The chat completion kvproxy asks the primary for (llama-server's own conversion, plus the
    response format and kvproxy's default completion limit)."""
    out = {k: v for k, v in body.items() if k not in _RESPONSES_ONLY}
    out["messages"] = messages
    limit = body.get("max_output_tokens")
    if limit is not None:
        out["max_tokens"] = limit
    elif max_tokens_default > 0:
        out["max_tokens"] = max_tokens_default
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
