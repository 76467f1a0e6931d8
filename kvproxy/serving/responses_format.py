"""One generation as a Responses API object, or as its stream of SSE events.

Shared by the embedded serving (backend events) and the relay (an upstream's chat completion), so a
response has the same shape whichever kind of deployment produced it. A stream goes
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` (one a text delta),
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done`` and ends
in ``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut it short, or
``response.failed`` when generation broke off); every event carries its ``sequence_number``. As on
OpenAI's API, no ``data: [DONE]`` follows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from kvproxy import sse
from kvproxy.protocol_responses import (
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesLogprob,
    ResponsesRequest,
    ResponsesUsage,
)


def responses_usage(prompt_tokens: int, completion_tokens: int) -> ResponsesUsage:
    return ResponsesUsage(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """What a response repeats of its request (OpenAI's response object echoes its parameters)."""
    fmt = req.text.format if req.text and req.text.format else None
    out: dict[str, Any] = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "top_logprobs": req.top_logprobs or 0,
        "parallel_tool_calls": bool(req.parallel_tool_calls),
        "tool_choice": "none" if req.tool_choice == "none" else "auto",
        "user": req.user,
        "metadata": req.metadata or {},
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
    }
    if fmt is not None:
        out["text"] = {"format": fmt.model_dump(by_alias=True, exclude_none=True), "verbosity": "medium"}
    return out


class ResponsesRenderer:
    """Builds one response: its final object (not streamed) or its events (streamed)."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.created_at = int(time.time())
        self._echo = _echo(req)
        self._sequence = 0
        self._text: list[str] = []
        self._logprobs: list[ResponsesLogprob] = []

    # ---- objects ----------------------------------------------------------------------------

    def _part(self) -> OutputText:
        return OutputText(text="".join(self._text), logprobs=self._logprobs)

    def _message(self, status: str) -> OutputMessage:
        return OutputMessage(id=self.item_id, status=status, content=[self._part()])

    def snapshot(
        self,
        status: str,
        *,
        usage: ResponsesUsage | None = None,
        error: ResponseError | None = None,
        output: bool = True,
    ) -> ResponseObject:
        incomplete = status == "incomplete"
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            completed_at=int(time.time()) if status == "completed" else None,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            model=self.model,
            output=[self._message("incomplete" if incomplete else "completed")] if output else [],
            usage=usage,
            **self._echo,
        )

    def add(self, text: str, logprobs: Sequence[ResponsesLogprob] = ()) -> None:
        self._text.append(text)
        self._logprobs.extend(logprobs)

    def response(self, finish_reason: str | None, usage: ResponsesUsage) -> ResponseObject:
        """The whole response, once everything has been :meth:`add`-ed."""
        return self.snapshot(_status(finish_reason), usage=usage)

    # ---- stream events ----------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse.encode(data, event=kind)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def start(self) -> bytes:
        opening = self.snapshot("in_progress", output=False).model_dump(mode="json")
        empty = OutputText(text="").model_dump(mode="json")
        item = OutputMessage(id=self.item_id, status="in_progress", content=[]).model_dump(mode="json")
        return b"".join(
            [
                self._event("response.created", response=opening),
                self._event("response.in_progress", response=opening),
                self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._at(), part=empty),
            ]
        )

    def delta(self, text: str, logprobs: Sequence[ResponsesLogprob] = ()) -> bytes:
        self.add(text, logprobs)
        wire = [lp.model_dump(mode="json") for lp in logprobs]
        return self._event("response.output_text.delta", **self._at(), delta=text, logprobs=wire)

    def finish(self, finish_reason: str | None, usage: ResponsesUsage) -> bytes:
        status = _status(finish_reason)
        final = self.snapshot(status, usage=usage)
        part = self._part().model_dump(mode="json")
        item = final.output[0].model_dump(mode="json")
        return b"".join(
            [
                self._event(
                    "response.output_text.done", **self._at(), text=part["text"], logprobs=part["logprobs"]
                ),
                self._event("response.content_part.done", **self._at(), part=part),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(f"response.{status}", response=final.model_dump(mode="json")),
            ]
        )

    def failed(self, message: str) -> bytes:
        """Generation broke off mid-stream: the response ends as failed."""
        error = ResponseError(code="server_error", message=message)
        failed = self.snapshot("failed", error=error).model_dump(mode="json")
        return self._event("response.failed", response=failed)


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"
