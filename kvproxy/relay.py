"""Serving logic for deployments whose primary is llama-server over HTTP.

The proxy checks only what it must (a JSON object with ``model``, the fields it reads itself) and
leaves every other parameter to the upstream, which supports more than the embedded backend does
(tools, grammars, JSON schemas with ``--jinja``); the upstream's errors come back as OpenAI errors.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvproxy.backends.llama_server import PrimaryReport, strip_logprobs
from kvproxy.errors import OpenAIError, pydantic_error
from kvproxy.serving import SSE_HEADERS
from kvproxy.shadow import ShadowDirective, ShadowJob, ShadowTicket

if TYPE_CHECKING:
    from kvproxy.deployment import HttpDeployment

log = logging.getLogger(__name__)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False


class RelayChatRequest(_Lenient):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None


class RelayCompletionRequest(_Lenient):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[int, Field(ge=0)] | None = None


def _validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise pydantic_error(exc) from exc


class RelayServing:
    def __init__(self, deployment: HttpDeployment) -> None:
        self.deployment = deployment

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None) -> Response:
        req: RelayChatRequest = _validated(RelayChatRequest, body)
        wants = (bool(req.logprobs), req.top_logprobs or 0)
        ask: dict[str, Any] = {"logprobs": True, "top_logprobs": max(wants[1], self.deployment.top_k)}
        return await self._serve(
            "/v1/chat/completions", raw, body, req.stream, shadow, wants, ask, {"messages": req.messages}
        )

    async def handle_completion(
        self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None
    ) -> Response:
        req: RelayCompletionRequest = _validated(RelayCompletionRequest, body)
        wants = (req.logprobs is not None, req.logprobs or 0)
        ask: dict[str, Any] = {"logprobs": max(wants[1], self.deployment.top_k)}
        prompt = (
            req.prompt[0]
            if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str)
            else req.prompt
        )
        return await self._serve(
            "/v1/completions", raw, body, req.stream, shadow, wants, ask, {"prompt": prompt}
        )

    async def _serve(
        self,
        path: str,
        raw: bytes,
        body: dict[str, Any],
        stream: bool,
        shadow: ShadowDirective | None,
        wants: tuple[bool, int],
        ask: dict[str, Any],
        source: dict[str, Any],
    ) -> Response:
        dep = self.deployment
        ticket = dep.ticket(shadow)
        if ticket is None:  # relay the bytes untouched
            if stream:
                chunks = await dep.primary.open_stream(path, raw)
                return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
            content = await dep.primary.post_json(path, raw)
            try:  # relayed as sent, but never a 200 that no client can parse
                orjson.loads(content)
            except ValueError as exc:
                raise _invalid_json(dep, exc) from exc
            return Response(content, media_type="application/json")
        client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:  # the usage says how many tokens were generated: needed to check the logprobs
            ask["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        upstream_body = orjson.dumps({**body, **ask})
        report = PrimaryReport()
        try:
            if stream:
                events = await dep.primary.open_stream(path, upstream_body)
                return StreamingResponse(
                    self._rewrite_stream(events, ticket, report, wants, source, client_usage),
                    media_type="text/event-stream",
                    headers=SSE_HEADERS,
                )
            content = await dep.primary.post_json(path, upstream_body)
            try:
                data = orjson.loads(content)
            except ValueError as exc:
                raise _invalid_json(dep, exc) from exc
        except BaseException:
            ticket.abandon()
            raise
        for choice in data.get("choices") or []:
            report.add(strip_logprobs(choice, *wants))
        report.note_end(data)
        _settle(ticket, report, source, streamed=False)
        return Response(orjson.dumps(data), media_type="application/json")

    @staticmethod
    async def _rewrite_stream(
        events: AsyncIterator[bytes],
        ticket: ShadowTicket,
        report: PrimaryReport,
        wants: tuple[bool, int],
        source: dict[str, Any],
        client_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Re-emit the upstream's SSE events without what the client did not ask for (logprobs,
        the usage chunk)."""
        buffer = b""
        try:
            async for chunk in events:
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out = _rewrite_event(event, report, wants, client_usage)
                    if out is not None:
                        yield out + b"\n\n"
                    if event.strip() == b"data: [DONE]":
                        _settle(ticket, report, source, streamed=True)
            if buffer.strip():
                yield buffer
        finally:
            ticket.abandon()  # a no-op once submitted


def _invalid_json(dep: HttpDeployment, exc: ValueError) -> OpenAIError:
    dep.primary.record_error("invalid_response")
    return OpenAIError(
        502,
        f"The upstream answered with invalid JSON: {exc}",
        type="server_error",
        code="upstream_invalid_response",
    )


def _settle(ticket: ShadowTicket, report: PrimaryReport, source: dict[str, Any], *, streamed: bool) -> None:
    if report.aligned(streamed=streamed):
        ticket.submit(ShadowJob(source=source, report=report))
    else:
        log.debug(
            "shadow job dropped: %d logprob entries for %s tokens",
            len(report.token_ids),
            report.completion_tokens,
        )
        ticket.abandon()


def _rewrite_event(
    event: bytes, report: PrimaryReport, wants: tuple[bool, int], client_usage: bool
) -> bytes | None:
    if not event.startswith(b"data: {"):
        return event
    try:
        data = orjson.loads(event[6:])
    except ValueError:
        return event
    if "choices" not in data:
        return event
    report.note_end(data)
    if not data["choices"] and "usage" in data and not client_usage:
        return None  # the usage chunk kvproxy asked for, not the client
    for choice in data["choices"]:
        if choice.get("logprobs"):
            report.add(strip_logprobs(choice, *wants))
        elif not wants[0]:
            choice.pop("logprobs", None)
    return b"data: " + orjson.dumps(data)
