"""Serving for deployments whose primary is llama-server over HTTP.

The proxy checks only what it must (a JSON object with ``model``, the fields it reads itself) and
leaves every other parameter to the upstream, which supports more than the embedded backend does
(tools, grammars, JSON schemas with ``--jinja``); the upstream's errors come back as OpenAI errors.
Unsampled requests are relayed byte for byte. A shadowed request asks the primary for logprobs,
strips what the client did not ask for, and hands what the primary reported to the shadow path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvproxy import sse
from kvproxy.deployments.http import HttpDeployment
from kvproxy.errors import OpenAIError, upstream_error
from kvproxy.serving.base import SSE_HEADERS, SSE_MEDIA_TYPE, validated
from kvproxy.shadow.job import PrimaryReport, ShadowJob
from kvproxy.shadow.pool import ShadowDirective, ShadowTicket
from kvproxy.upstream.llama_server import strip_logprobs
from kvproxy.upstream.replicas import UpstreamFailure

log = logging.getLogger(__name__)

Wants = tuple[bool, int]  # (logprobs asked for, top_logprobs asked for)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False


class RelayChatRequest(_Lenient):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0)] | None = None


# llama-server reads token ids as int32 and wraps larger ones (2**32 + 5 became 5): refused here
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class RelayCompletionRequest(_Lenient):
    prompt: str | list[str] | list[TokenId]
    logprobs: Annotated[int, Field(ge=0)] | None = None


def _text_only(messages: list[dict[str, Any]]) -> None:
    """A 400 for a content part that is not text (an image, audio, a file). kvproxy serves text: the
    embedded backend refuses such parts too, and the shadow path replays prompts as text. A primary
    without a projector answered them with a 500, which reached the client as a 502."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise OpenAIError(
                    400,
                    f"Content parts of type {kind!r} are not supported: kvproxy serves text only.",
                    param=f"messages.{i}.content.{j}.type",
                    code="unsupported_content",
                )


async def _error_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream as relayed; a failure mid-stream ends it with an SSE error event."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield chunk
        except UpstreamFailure as failure:
            yield sse.encode(upstream_error(failure).body())


def _streaming(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(_error_events(chunks), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


class RelayServing:
    def __init__(self, deployment: HttpDeployment) -> None:
        self.deployment = deployment

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None) -> Response:
        req = validated(RelayChatRequest, body)
        _text_only(req.messages)
        wants = (bool(req.logprobs), req.top_logprobs or 0)
        ask: dict[str, Any] = {"logprobs": True, "top_logprobs": max(wants[1], self.deployment.top_k)}
        return await self._serve(
            "/v1/chat/completions", raw, body, req.stream, shadow, wants, ask, {"messages": req.messages}
        )

    async def handle_completion(
        self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None
    ) -> Response:
        req = validated(RelayCompletionRequest, body)
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
        wants: Wants,
        ask: dict[str, Any],
        source: dict[str, Any],
    ) -> Response:
        try:
            ticket = self.deployment.ticket(shadow)
            if ticket is None:
                return await self._relay(path, raw, stream)
            return await self._shadowed(path, body, stream, ticket, wants, ask, source)
        except UpstreamFailure as failure:
            raise upstream_error(failure) from failure

    async def _relay(self, path: str, raw: bytes, stream: bool) -> Response:
        """Unsampled: the bytes as they are, both ways."""
        primary = self.deployment.primary
        if stream:
            return _streaming(await primary.open_stream(path, raw))
        content = await primary.post_json(path, raw)
        try:  # relayed as sent, but never a 200 that no client can parse
            orjson.loads(content)
        except ValueError as exc:
            raise self._invalid_json(exc) from exc
        return Response(content, media_type="application/json")

    async def _shadowed(
        self,
        path: str,
        body: dict[str, Any],
        stream: bool,
        ticket: ShadowTicket,
        wants: Wants,
        ask: dict[str, Any],
        source: dict[str, Any],
    ) -> Response:
        primary = self.deployment.primary
        client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:  # the usage says how many tokens were generated: needed to check the logprobs
            ask["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        upstream_body = orjson.dumps({**body, **ask})
        report = PrimaryReport()
        try:
            if stream:
                events = await primary.open_stream(path, upstream_body)
                return _streaming(_rewrite_stream(events, ticket, report, wants, source, client_usage))
            content = await primary.post_json(path, upstream_body)
            try:
                data = orjson.loads(content)
            except ValueError as exc:
                raise self._invalid_json(exc) from exc
        except BaseException:
            ticket.abandon()
            raise
        for choice in data.get("choices") or []:
            report.add(strip_logprobs(choice, *wants))
        report.note_end(data)
        _settle(ticket, report, source, streamed=False)
        return Response(orjson.dumps(data), media_type="application/json")

    def _invalid_json(self, exc: ValueError) -> OpenAIError:
        self.deployment.primary.record_error("invalid_response")
        return OpenAIError(
            502,
            f"The upstream answered with invalid JSON: {exc}",
            type="server_error",
            code="upstream_invalid_response",
        )


async def _rewrite_stream(
    chunks: AsyncIterator[bytes],
    ticket: ShadowTicket,
    report: PrimaryReport,
    wants: Wants,
    source: dict[str, Any],
    client_usage: bool,
) -> AsyncIterator[bytes]:
    """Re-emit the upstream's SSE events without what the client did not ask for (logprobs, the
    usage chunk); events that need no change go out as they came."""
    decoder = sse.SSEDecoder()
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                out = _rewrite_events(decoder.feed(chunk), ticket, report, wants, source, client_usage)
                if out:
                    yield out
        out = _rewrite_events(decoder.close(), ticket, report, wants, source, client_usage)
        if out or decoder.pending.strip():
            yield out + decoder.pending
    finally:
        ticket.abandon()  # a no-op once submitted


def _rewrite_events(
    events: list[sse.Event],
    ticket: ShadowTicket,
    report: PrimaryReport,
    wants: Wants,
    source: dict[str, Any],
    client_usage: bool,
) -> bytes:
    out = []
    for event in events:
        rewritten = _rewrite_event(event, report, wants, client_usage)
        if rewritten is not None:
            out.append(rewritten)
        if event.is_done:
            _settle(ticket, report, source, streamed=True)
    return b"".join(out)


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


def _rewrite_event(event: sse.Event, report: PrimaryReport, wants: Wants, client_usage: bool) -> bytes | None:
    """The event to send on, or None to drop it (the usage chunk only kvproxy asked for)."""
    if event.data is None or not event.data.startswith(b"{"):
        return event.raw
    try:
        data = orjson.loads(event.data)
    except ValueError:
        return event.raw
    if not isinstance(data, dict) or "choices" not in data:
        return event.raw
    report.note_end(data)
    if not data["choices"] and "usage" in data and not client_usage:
        return None
    for choice in data["choices"]:
        if choice.get("logprobs"):
            report.add(strip_logprobs(choice, *wants))
        elif not wants[0]:
            choice.pop("logprobs", None)
    return sse.encode(orjson.dumps(data), newline=event.newline)
