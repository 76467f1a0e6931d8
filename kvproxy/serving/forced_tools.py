"""Forced tool calls in proxy mode: ``tool_choice: required`` or a named function.

The pinned llama-server does not force them: its autoparser lets free text come before a required
call (``reasoning + optional(content(until(trigger))) + tool_calls + end``), so the default Gemma 3
270M answered text, and it refuses a client's ``grammar`` with ``tools``. kvproxy forces such a call
as the embedded backend does, on the primary's own parts:

* the prompt is the primary's own render of the request (``/apply-template``, tools included: the
  text its ``/v1/chat/completions`` would have fed the model);
* the grammar is the embedded backend's Hermes one (kvproxy.tool_calls.hermes: one tagged call of a
  callable function, its arguments matching the function's schema), compiled in kvproxy's grammar
  child process under the schema limits;
* the prompt and the grammar go to the primary's ``/v1/completions`` (no message cuts: a shadow job
  says so by carrying ``{"prompt": ...}``, kvproxy.scoring.scorers), the output is parsed by the
  embedded backend's parser and answered as a chat completion, streamed or not (a streamed one sends
  its call once generated, as the embedded backend does), or as a Responses object or its events
  (``/v1/responses``, built from that chat completion as every Responses answer is).

Only for templates whose calls are Hermes-style (kvproxy's Gemma template, Qwen 2.5/3, Hermes):
other requests, and ``auto``/``none``, stay llama-server's.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from kvproxy.protocol import (
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    FinishReason,
    FunctionDelta,
    MessageToolCall,
    ToolCallDelta,
    Usage,
)
from kvproxy.tool_calls import ToolChoice, ToolPlan, hermes, new_call_id

# what a chat request holds that a raw completion does not take (the rest is sampling: passed on)
_CHAT_ONLY = (
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "max_completion_tokens",
    "reasoning_format",
)


def forced_plan(body: dict[str, Any]) -> ToolPlan | None:
    """The request's plan when it forces a call (tools, and ``required`` or a named function
    among them); None otherwise."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    if not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        return None  # llama-server's 400
    choice = body.get("tool_choice")
    if choice == "required":
        mode = ToolChoice("required")
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or not any(t["function"].get("name") == name for t in tools):
            return None  # llama-server's error for an unknown name
        mode = ToolChoice("required", name)
    else:
        return None
    # llama-server's default: one call unless the client allows several
    return ToolPlan(tuple(tools), mode, body.get("parallel_tool_calls") is True)


def completion_body(body: dict[str, Any], prompt: str, grammar: str) -> dict[str, Any]:
    """The ``/v1/completions`` request: the rendered prompt, the grammar, the client's sampling."""
    out = {k: v for k, v in body.items() if k not in _CHAT_ONLY}
    limit = body.get("max_completion_tokens")
    if out.get("max_tokens") is None and limit is not None:
        out["max_tokens"] = limit
    out.update(prompt=prompt, grammar=grammar, stream=False)
    return out


def chat_answer(data: dict[str, Any], model: str, fingerprint: str) -> ChatCompletion:
    """The ``/v1/completions`` answer as a chat completion (the output parsed for calls)."""
    choice = (data.get("choices") or [{}])[0]
    text = str(choice.get("text") or "")
    content, parsed = hermes.parse(text)
    calls = [
        MessageToolCall(id=new_call_id(), function=CalledFunction(name=c.name, arguments=c.arguments))
        for c in parsed
    ]
    finish: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
    if calls and finish == "stop":
        finish = "tool_calls"
    u = data.get("usage") or {}
    usage = Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        total_tokens=int(u.get("total_tokens") or 0),
    )
    return ChatCompletion(
        id="chatcmpl-" + secrets.token_hex(16),
        created=int(data.get("created") or time.time()),
        model=model,
        system_fingerprint=fingerprint,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=content, tool_calls=calls or None), finish_reason=finish
            )
        ],
        usage=usage,
    )


Chunk = tuple[ChatCompletionChunk, set[str]]  # a chunk and the fields it is sent without


def chat_chunks(answer: ChatCompletion, include_usage: bool) -> list[Chunk]:
    """The answer as a chat stream's chunks (``[DONE]`` not included): the role, the content if
    any, each call as one tool-call delta, the finish, the usage if asked."""

    def chunk(delta: ChatDelta | None = None, finish: FinishReason | None = None) -> Chunk:
        c = ChatCompletionChunk(
            id=answer.id,
            created=answer.created,
            model=answer.model,
            system_fingerprint=answer.system_fingerprint,
            choices=[] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish)],
        )
        if delta is None:
            c.usage = answer.usage
            return c, set()
        return c, {"usage"}

    message = answer.choices[0].message
    out = [chunk(ChatDelta(role="assistant", content=""))]
    if message.content:
        out.append(chunk(ChatDelta(content=message.content)))
    for i, call in enumerate(message.tool_calls or []):
        delta = ToolCallDelta(
            index=i,
            id=call.id,
            type="function",
            function=FunctionDelta(name=call.function.name, arguments=call.function.arguments),
        )
        out.append(chunk(ChatDelta(tool_calls=[delta])))
    out.append(chunk(ChatDelta(), answer.choices[0].finish_reason))
    if include_usage:
        out.append(chunk())
    return out
