"""llama-server over HTTP: relaying OpenAI requests to the primary (scoring: kvproxy.scoring.llama_server).

Unsampled requests are relayed byte for byte (the body as the client sent it, the response and SSE
chunks as the upstream sent them): no JSON is parsed on that path. A shadowed request asks the
primary for ``logprobs`` with ``top_logprobs = K`` (every llama-server logprob entry carries the token
id), parses the response, takes the generated token ids and the primary's top-K per position, and
strips from the client's response what the client did not ask for.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from kvproxy import sse
from kvproxy.observers import NULL_SERVING, ServingEvents, TokenClock
from kvproxy.sse import EventTooLarge, SSEDecoder
from kvproxy.upstream.replicas import (
    JSON_HEADERS,
    Replica,
    ReplicaPool,
    UpstreamError,
    UpstreamFailure,
    dropped,
    is_timeout,
    map_transport_error,
    map_upstream_status,
    read_capped,
    refused,
    too_large,
)

log = logging.getLogger(__name__)

DONE_END = (b"[DONE]",)  # an OpenAI stream's end: its last event is ``data: [DONE]``
_USAGE_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_USAGE_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')


def strip_logprobs(choice: dict[str, Any], wants_logprobs: bool, wants_top: int) -> list[dict[str, Any]]:
    """Take the logprob entries out of one choice, leaving what the client asked for."""
    lp = choice.get("logprobs")
    entries: list[dict[str, Any]] = (lp.get("content") if isinstance(lp, dict) else None) or []
    if not wants_logprobs:
        # absent, as llama-server answers a request without logprobs: shadowing stays invisible
        choice.pop("logprobs", None)
    elif entries:
        choice["logprobs"] = {
            **lp,  # type: ignore[dict-item]
            "content": [{**e, "top_logprobs": (e.get("top_logprobs") or [])[:wants_top]} for e in entries],
        }
    return entries


class LlamaServerPrimary:
    """Serves one deployment's requests from llama-server replicas."""

    def __init__(self, pool: ReplicaPool, *, top_k: int, events: ServingEvents = NULL_SERVING) -> None:
        self.pool = pool
        self.top_k = top_k
        self.events = events

    def record_error(self, kind: str) -> None:
        self.events.upstream_error(kind)

    def _failure(self, replica: Replica, exc: BaseException) -> UpstreamFailure:
        """Count an exchange that failed below HTTP and say it as the client's error."""
        self.record_error("timeout" if is_timeout(exc) else "unavailable")
        return map_transport_error(replica, exc)

    # ---- relay without shadow ---------------------------------------------------------------

    async def _send(
        self, path: str, content: bytes, *, deadline: float
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send to the least busy replica; a refused connection (the request never reached it) ejects
        that replica and tries the next one. Returns with the replica's outstanding count held and
        the response's headers read (its body not yet).

        A connection dropped before any answer came (a pooled keep-alive socket llama-server closed
        just as it was reused: ``ServerDisconnectedError``, "Can not write request body") is sent
        once more (to the least busy replica), as :meth:`Replica.post` does for the shadow's
        exchanges, and neither ejects the replica nor counts as an error unless that second try fails too. A
        generation request is not idempotent, but llama-server cancels a task whose connection
        closed, and a client would otherwise get a 502 for a race it cannot see (the official
        clients retry connection errors themselves; kvproxy retries once so they need not)."""
        attempts = len(self.pool.replicas)
        redo_drop = True
        attempt = 0
        while attempt < attempts:
            replica = self.pool.pick()
            replica.outstanding += 1
            try:
                async with asyncio.timeout_at(deadline):
                    resp = await replica.session.post(replica.url + path, data=content, headers=JSON_HEADERS)
                    if resp.status != 200:
                        try:
                            body = await read_capped(resp, replica.url, self.pool.limits.max_body_bytes)
                        except UpstreamFailure:
                            resp.close()
                            body = b""
                        resp.release()
                        self.record_error("status")
                        raise map_upstream_status(replica, resp.status, body)
                return replica, resp
            except UpstreamError as exc:
                replica.outstanding -= 1
                if redo_drop and dropped(exc):
                    redo_drop = False
                    log.info("upstream %s dropped a pooled connection (%s); sent once more", replica.url, exc)
                    continue
                err = self._failure(replica, exc)
                if not refused(exc) or attempt + 1 == attempts:
                    raise err from exc
                attempt += 1
            except BaseException:
                replica.outstanding -= 1
                raise
        raise AssertionError("unreachable")

    async def post_json(self, path: str, content: bytes) -> bytes:
        deadline = asyncio.get_running_loop().time() + self.pool.timeouts.total
        replica, resp = await self._send(path, content, deadline=deadline)
        body = await self._read_whole(replica, resp, deadline)
        self._count_usage(body)
        return body

    async def _read_whole(self, replica: Replica, resp: aiohttp.ClientResponse, deadline: float) -> bytes:
        """The whole body, at most ``max_body_bytes`` of it (the rest of a larger one is never
        read); the replica's request ends here either way."""
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_capped(resp, replica.url, self.pool.limits.max_body_bytes)
        except UpstreamError as exc:
            resp.close()
            raise self._failure(replica, exc) from exc
        except UpstreamFailure:
            resp.close()
            self.record_error("too_large")
            raise
        finally:
            replica.outstanding -= 1
        resp.release()
        return body

    def _count_usage(self, body: bytes) -> None:
        """Token counts from the usage object, without parsing the whole response."""
        if not self.events.active:
            return
        tail = body[-600:]
        prompt, completion = _USAGE_PROMPT.search(tail), _USAGE_COMPLETION.search(tail)
        if prompt and completion:
            self.events.tokens(int(prompt.group(1)), int(completion.group(1)))

    async def open_stream(
        self, path: str, content: bytes, *, ends: tuple[bytes, ...] | None = DONE_END
    ) -> AsyncIterator[bytes]:
        """Start a streamed request and wait for the upstream's status before any byte goes out.

        Returns the raw SSE byte stream, cut at event boundaries (LF, CRLF or CR line ends): an event
        split across chunks is held until it is whole. If the upstream dies or stalls mid-stream, or
        ends without ``data: [DONE]`` (or, given ``ends``, without an event holding one of those
        markers; ``None``: any end is an end), the iterator raises :class:`UpstreamFailure` after
        the last whole event (the serving layer sends it as an SSE error event) and closes.
        """
        deadline = asyncio.get_running_loop().time() + self.pool.timeouts.total
        replica, resp = await self._send(path, content, deadline=deadline)
        if resp.content_type == "application/json":  # a 200 that is no stream: an error object, say
            body = await self._read_whole(replica, resp, deadline)
            self.record_error("invalid_response")
            raise not_a_stream(replica, body)
        clock = TokenClock(self.events)
        max_event = self.pool.limits.max_event_bytes

        async def relay() -> AsyncIterator[bytes]:
            tail = last = b""  # the stream's last bytes (usage), its last whole events ([DONE])
            decoder = SSEDecoder(max_event_bytes=max_event)
            markers = None if ends is DONE_END else ends
            ended = ends is None
            try:
                async with asyncio.timeout_at(deadline):
                    async for chunk in resp.content.iter_any():
                        clock.tick()  # a chunk is about one token: llama-server flushes per token
                        tail = (tail + chunk)[-600:]
                        whole = decoder.feed_raw(chunk)
                        if whole:
                            if markers and not ended:
                                ended = any(m in whole for m in markers)
                            last = whole
                            yield whole
                if decoder.pending:
                    yield decoder.pending
                self._count_usage(tail)
                if ends is DONE_END:
                    ended = sse.ends_done(last, decoder.pending)
                if not ended:
                    self.record_error("stream_ended")
                    raise UpstreamFailure(
                        502,
                        f"The upstream {replica.url} ended the stream early.",
                        type="server_error",
                        code="upstream_stream_ended",
                    )
            except UpstreamError as exc:
                raise self._failure(replica, exc) from exc
            except EventTooLarge as exc:
                self.record_error("too_large")
                raise too_large(replica.url, "an SSE event", exc.limit, "upstream_max_event_bytes") from exc
            finally:
                if resp.content.at_eof():
                    resp.release()  # the connection goes back to the pool
                else:
                    resp.close()  # a client that left (or a broken stream) closes the upstream request
                replica.outstanding -= 1

        return relay()


def not_a_stream(replica: Replica, body: bytes) -> UpstreamFailure:
    """A streamed request answered 200 with a JSON body instead of events: the upstream's error
    object as a 502 (its message kept), or an invalid response."""
    try:
        failure = error_object(replica.url, orjson.loads(body))
    except ValueError:
        failure = None
    return failure or UpstreamFailure(
        502,
        f"The upstream {replica.url} answered a streamed request with JSON, not a stream.",
        type="server_error",
        code="upstream_invalid_response",
    )


def error_object(url: str | None, data: Any) -> UpstreamFailure | None:
    """A 200 whose body is ``{"error": ...}`` is a failure the upstream said with the wrong status:
    502 ``upstream_error`` with its message, never relayed as a success."""
    if not isinstance(data, dict) or "error" not in data:
        return None
    err = data["error"]
    message = err.get("message") if isinstance(err, dict) else err
    return UpstreamFailure(
        502,
        f"The upstream{' ' + url if url else ''} answered 200 with an error: {str(message or err)[:500]}",
        type="server_error",
        code="upstream_error",
    )
