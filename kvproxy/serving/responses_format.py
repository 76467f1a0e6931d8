"""A chat completion (or its chunks) as a Responses API object (or its stream of SSE events).

Shared by both modes (kvproxy.serving.responses_chat): the embedded chat path and the primary's
``/v1/chat/completions`` both produce chat completions, rendered here. The output is an assistant
``message`` (its text, one ``output_text`` part) and/or one ``function_call`` item a tool call, in
the order they came. A stream goes ``response.created``, ``response.in_progress``, then per item
``response.output_item.added``; for a message ``response.content_part.added``,
``response.output_text.delta``..., ``response.output_text.done``, ``response.content_part.done``; for
a call ``response.function_call_arguments.delta``..., ``response.function_call_arguments.done``; then
``response.output_item.done``; it ends in ``response.completed``, or ``response.incomplete`` (with
``incomplete_details.reason`` ``max_output_tokens`` or ``content_filter``) when the answer was cut, or
``response.failed`` when generation broke off. Every event carries its ``sequence_number``, and
``output_index`` (and ``item_id``, ``content_index``) where OpenAI's have them. As on OpenAI's API,
no ``data: [DONE]`` follows.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kvproxy import sse
from kvproxy.protocol_responses import (
    IncompleteDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesLogprob,
    ResponsesRequest,
    ResponsesUsage,
)
from kvproxy.serving.responses_chat import responses_logprobs

# chat finish reasons that mean the answer was cut, as the Responses API says it
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def responses_usage(prompt_tokens: int, completion_tokens: int) -> ResponsesUsage:
    return ResponsesUsage(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def chat_usage(data: dict[str, Any]) -> ResponsesUsage:
    """A chat completion's ``usage`` as the Responses API's."""
    found = data.get("usage")
    got: dict[str, Any] = found if isinstance(found, dict) else {}
    return responses_usage(int(got.get("prompt_tokens") or 0), int(got.get("completion_tokens") or 0))


def _echo(req: ResponsesRequest, cap: int | None) -> dict[str, Any]:
    """What a response repeats of its request (OpenAI's response object echoes its parameters);
    ``max_output_tokens`` is the cap applied (the request's, else the default output cap)."""
    fmt = req.text.format if req.text and req.text.format else None
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    out: dict[str, Any] = {
        "instructions": req.instructions,
        "max_output_tokens": cap,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "top_logprobs": req.top_logprobs or 0,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "tool_choice": choice if isinstance(choice, (str, dict)) else "auto",
        "tools": [_echo_tool(t) for t in req.tools or []],
        "user": req.user,
        "metadata": req.metadata or {},
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
    }
    if fmt is not None:
        out["text"] = {"format": fmt.model_dump(by_alias=True, exclude_none=True), "verbosity": "medium"}
    return out


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as OpenAI echoes it (``strict`` and ``parameters`` always present)."""
    return {
        "type": "function",
        "name": tool.get("name"),
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict", True),
    }


@dataclass
class _Call:
    """One function call being built from chat tool-call deltas."""

    id: str
    call_id: str
    name: str
    output_index: int
    arguments: list[str] = field(default_factory=list)

    def item(self, status: str) -> OutputFunctionCall:
        return OutputFunctionCall(
            id=self.id, status=status, call_id=self.call_id, name=self.name, arguments="".join(self.arguments)
        )


@dataclass
class _Message:
    """One assistant message being built from chat content deltas."""

    id: str
    output_index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[ResponsesLogprob] = field(default_factory=list)

    def part(self) -> OutputText:
        return OutputText(text="".join(self.text), logprobs=self.logprobs)

    def item(self, status: str) -> OutputMessage:
        return OutputMessage(id=self.id, status=status, content=[self.part()])

    def at(self) -> dict[str, Any]:
        return {"item_id": self.id, "output_index": self.output_index, "content_index": 0}


class ResponsesRenderer:
    """Builds one response from a chat completion: its final object (:meth:`from_chat`) or, from the
    chat stream's chunks, its events (:meth:`start`, :meth:`chunk`, :meth:`finish`)."""

    def __init__(self, req: ResponsesRequest, model: str, cap: int | None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.model = model
        self.created_at = int(time.time())
        self._echo = _echo(req, cap)
        self._sequence = 0
        self._items: list[_Message | _Call] = []  # in output order
        self._open: _Message | _Call | None = None  # the item being added to
        self._calls: dict[int, _Call] = {}  # by the chat tool call's index
        self._finish: str | None = None

    # ---- objects ----------------------------------------------------------------------------

    def _output(self, status: str) -> list[OutputItem]:
        return [item.item(status) for item in self._items]

    def snapshot(
        self,
        status: str,
        *,
        usage: ResponsesUsage | None = None,
        error: ResponseError | None = None,
        output: bool = True,
    ) -> ResponseObject:
        reason = _INCOMPLETE.get(self._finish or "") if status == "incomplete" else None
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            completed_at=int(time.time()) if status == "completed" else None,
            error=error,
            incomplete_details=IncompleteDetails(reason=reason) if reason else None,
            model=self.model,
            output=self._output("incomplete" if reason else "completed") if output else [],
            usage=usage,
            **self._echo,
        )

    def _status(self) -> str:
        return "incomplete" if self._finish in _INCOMPLETE else "completed"

    def from_chat(self, data: dict[str, Any]) -> ResponseObject:
        """The whole response, from a whole chat completion (its first choice)."""
        choices = data.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        text = message.get("content")
        if text or not message.get("tool_calls"):  # no empty message beside tool calls, as OpenAI
            self._add_text(str(text or ""), responses_logprobs(choice))
        for i, call in enumerate(message.get("tool_calls") or []):
            self._open = None
            self._add_call(i, call)
        self._finish = choice.get("finish_reason")
        return self.snapshot(self._status(), usage=chat_usage(data))

    def _add_text(self, text: str, logprobs: list[ResponsesLogprob]) -> tuple[_Message, bool]:
        """The message being added to (new: True when it starts here), with this text added."""
        item = self._open
        new = not isinstance(item, _Message)
        if not isinstance(item, _Message):
            item = _Message(f"msg_{uuid.uuid4().hex}", len(self._items))
            self._items.append(item)
            self._open = item
        item.text.append(text)
        item.logprobs.extend(logprobs)
        return item, new

    def _add_call(self, index: int, delta: dict[str, Any]) -> tuple[_Call, bool]:
        """The call of this chat tool-call index (new: True when it starts here), its arguments added."""
        fn = delta.get("function") or {}
        call = self._calls.get(index)
        new = call is None
        if call is None:
            call_id = delta.get("id") or f"call_{uuid.uuid4().hex[:24]}"
            call = _Call(f"fc_{uuid.uuid4().hex}", str(call_id), str(fn.get("name") or ""), len(self._items))
            self._calls[index] = call
            self._items.append(call)
            self._open = call
        elif fn.get("name") and not call.name:
            call.name = str(fn["name"])
        if fn.get("arguments"):
            call.arguments.append(str(fn["arguments"]))
        return call, new

    # ---- stream events ----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse.encode(data, event=kind)

    def start(self) -> bytes:
        opening = self.snapshot("in_progress", output=False).model_dump(mode="json")
        return self._event("response.created", response=opening) + self._event(
            "response.in_progress", response=opening
        )

    def chunk(self, data: dict[str, Any]) -> bytes:
        """The events of one chat stream chunk (its first choice's delta)."""
        out: list[bytes] = []
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = str(delta.get("content") or "")
            logprobs = responses_logprobs(choice)
            if text or logprobs:
                out.append(self._text_delta(text, logprobs))
            for i, call in enumerate(delta.get("tool_calls") or []):
                out.append(self._call_delta(int(call.get("index", i)), call))
            self._finish = choice.get("finish_reason") or self._finish
        return b"".join(out)

    def _text_delta(self, text: str, logprobs: list[ResponsesLogprob]) -> bytes:
        out = b"" if isinstance(self._open, _Message) else self._close()
        item, new = self._add_text(text, logprobs)
        if new:
            added = OutputMessage(id=item.id, status="in_progress", content=[]).model_dump(mode="json")
            out += self._event("response.output_item.added", output_index=item.output_index, item=added)
            empty = OutputText(text="").model_dump(mode="json")
            out += self._event("response.content_part.added", **item.at(), part=empty)
        wire = [lp.model_dump(mode="json") for lp in logprobs]
        return out + self._event("response.output_text.delta", **item.at(), delta=text, logprobs=wire)

    def _call_delta(self, index: int, delta: dict[str, Any]) -> bytes:
        out = b""
        if index not in self._calls:
            out += self._close()
        call, new = self._add_call(index, delta)
        if new:
            item = call.item("in_progress").model_dump(mode="json")
            item["arguments"] = ""
            out += self._event("response.output_item.added", output_index=call.output_index, item=item)
            if call.arguments:
                out += self._args_delta(call, "".join(call.arguments))
        elif (delta.get("function") or {}).get("arguments"):
            out += self._args_delta(call, str(delta["function"]["arguments"]))
        return out

    def _args_delta(self, call: _Call, text: str) -> bytes:
        return self._event(
            "response.function_call_arguments.delta",
            item_id=call.id,
            output_index=call.output_index,
            delta=text,
        )

    def _close(self, status: str = "completed") -> bytes:
        """The done events of the item being added to, if any."""
        item, self._open = self._open, None
        if item is None:
            return b""
        if isinstance(item, _Call):
            done = item.item(status)
            return self._event(
                "response.function_call_arguments.done",
                item_id=item.id,
                output_index=item.output_index,
                name=item.name,
                arguments=done.arguments,
            ) + self._event(
                "response.output_item.done", output_index=item.output_index, item=done.model_dump(mode="json")
            )
        part = item.part().model_dump(mode="json")
        at = item.at()
        whole = item.item(status).model_dump(mode="json")
        return b"".join(
            [
                self._event("response.output_text.done", **at, text=part["text"], logprobs=part["logprobs"]),
                self._event("response.content_part.done", **at, part=part),
                self._event("response.output_item.done", output_index=at["output_index"], item=whole),
            ]
        )

    def finish(self, usage: ResponsesUsage) -> bytes:
        """The last events, once the chat stream ended."""
        status = self._status()
        out = b""
        if not self._items:  # nothing came: an empty message, as a non-streamed answer has
            out += self._text_delta("", [])
        out += self._close("incomplete" if status == "incomplete" else "completed")
        final = self.snapshot(status, usage=usage)
        return out + self._event(f"response.{status}", response=final.model_dump(mode="json"))

    def failed(self, message: str) -> bytes:
        """Generation broke off mid-stream: the response ends as failed."""
        error = ResponseError(code="server_error", message=message)
        failed = self.snapshot("failed", error=error).model_dump(mode="json")
        return self._event("response.failed", response=failed)


class StreamBroke(Exception):
    """The chat stream a response is built from broke off (its message ends the response)."""


async def render_stream(
    renderer: ResponsesRenderer, chats: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[bytes]:
    """A chat stream's chunks (parsed) as the Responses API's events; a chunk carrying ``usage``
    gives the response's. A stream that breaks (:class:`StreamBroke`) ends in ``response.failed``."""
    usage: dict[str, Any] = {}
    yield renderer.start()
    try:
        async with contextlib.aclosing(chats):  # type: ignore[type-var]
            async for data in chats:
                if isinstance(data.get("usage"), dict):
                    usage = data["usage"]
                out = renderer.chunk(data)
                if out:
                    yield out
        yield renderer.finish(chat_usage({"usage": usage}))
    except StreamBroke as exc:
        yield renderer.failed(str(exc))
