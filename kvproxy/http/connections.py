"""Connection hygiene: deadlines for a request's headers and body, and a cap on open connections.

uvicorn bounds neither: a connection that sends its headers (or its body) a byte every few seconds
stays open for good, and enough of them use up the process's file descriptors, after which nothing,
``/health`` included, can connect. This module is uvicorn's HTTP protocol (httptools) with:

* **A header deadline** (``--header-timeout``, 10 s): from the connection, or from the end of the
  previous response on a kept-alive connection, to the end of the request's headers. Past it the
  connection is closed, with a 408 if part of a request had arrived.
* **A body deadline** (``--body-timeout``, 60 s): from the end of the headers to the end of the
  body. Past it, a 408 (if no response has started) and the connection is closed; the route sees a
  client that left. A response sent before its body has all arrived (a 401, a 413) closes the
  connection rather than reading on: nobody needs the rest.
* **A cap on open connections** (``--max-connections``; by default what the open-file limit
  leaves, ``connection_budget``). At the cap a new connection first takes the place of the oldest
  one still waiting for its request's headers (a slow client, or an idle kept-alive one), which is
  closed. If every connection is busy with a request, the new one is answered 503 with
  ``Retry-After`` once its headers are in (``/health`` is still answered), and closed. Past a
  hard ceiling a little above the cap, new connections are closed at once unanswered, so the
  process never runs out of descriptors.

What happened is counted for the metrics (``kvproxy_connections_closed_total`` by reason) through a
callback, so this module knows nothing of Prometheus.
"""

from __future__ import annotations

import asyncio
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvproxy.errors import OpenAIError

# what the process keeps open besides client connections: the model file, the loop's own
# descriptors, the metrics port, log files, a margin; proxy mode adds its upstream connections
BASE_RESERVE = 64
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
OVER_CAP_HEADER_TIMEOUT = 2.0  # a connection over the cap gets this long to say what it wants
CAP_CEILING = 16384  # the automatic cap never goes above this many connections
RETRY_AFTER = b"retry-after: 1\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int  # the cap: more connections evict a waiting one, or are refused
    ceiling: int  # the hard ceiling: past it new connections are closed at once
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT


def file_limit(raise_soft: bool = True) -> int:
    """The open-file limit, raised first from the soft to the hard limit (as Go's runtime does):
    a soft limit of 1,024 is a default of old, not a choice."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 2**20


def connection_budget(fd_limit: int, upstream: int = 0, asked: int | None = None) -> ConnectionLimits:
    """The cap and its ceiling from the file limit, less ``BASE_RESERVE`` and the ``upstream``
    connections the process may open itself. The automatic cap leaves an eighth of what remains
    for connections refused over it. An ``asked`` cap that the files cannot carry is a ValueError."""
    ceiling = fd_limit - BASE_RESERVE - upstream
    if ceiling < 16:
        raise ValueError(
            f"the open-file limit ({fd_limit}) leaves too few descriptors for connections "
            f"({BASE_RESERVE} reserved, {upstream} for upstream connections); raise it (ulimit -n)"
        )
    auto = min(CAP_CEILING, ceiling - max(8, ceiling // 8))
    if asked is None:
        return ConnectionLimits(max_connections=auto, ceiling=min(ceiling, auto + max(8, auto // 8)))
    if asked > ceiling:
        raise ValueError(
            f"--max-connections {asked} is more than the open-file limit ({fd_limit}) allows: "
            f"{ceiling} at most; raise the limit (ulimit -n) or lower the cap"
        )
    return ConnectionLimits(max_connections=asked, ceiling=min(ceiling, asked + max(8, asked // 8)))


def _raw_response(err: OpenAIError, reason: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps(err.body())
    return (
        f"HTTP/1.1 {err.status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def _timeout_response(what: str, seconds: float) -> bytes:
    err = OpenAIError(
        408, f"The request's {what} did not arrive within {seconds:g} s.", code="request_timeout"
    )
    return _raw_response(err, "Request Timeout")


def _busy(limit: int) -> OpenAIError:
    return OpenAIError(
        503,
        f"The server has {limit:,} connections open, its limit (--max-connections); retry shortly.",
        type="server_error",
        code="too_many_connections",
    )


class ConnectionTable:
    """The open connections of one server; those still sending a request, oldest first: waiting for
    its headers, and receiving its body."""

    def __init__(self, limits: ConnectionLimits, on_close: Callable[[str], None]) -> None:
        self.limits = limits
        self.on_close = on_close  # told the reason of every connection closed by this module
        self.open: set[GuardedHttpProtocol] = set()
        self.waiting: OrderedDict[GuardedHttpProtocol, None] = OrderedDict()
        self.receiving: OrderedDict[GuardedHttpProtocol, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.open)

    def evict_oldest_sender(self) -> bool:
        """Close the connection that has been sending its request longest, headers before bodies
        (a kept-alive idle one waits for headers too); False when every connection is past that."""
        if self.waiting:
            oldest, _ = self.waiting.popitem(last=False)
            oldest.close_guarded("evicted")
            return True
        if self.receiving:
            oldest, _ = self.receiving.popitem(last=False)
            busy = _raw_response(_busy(self.limits.max_connections), "Service Unavailable", RETRY_AFTER)
            oldest.end_request("evicted", busy)
            return True
        return False


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines and the cap (one :class:`ConnectionTable` per
    server, set on the class by :func:`guarded_protocol`)."""

    table: ConnectionTable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._begun = False  # a request has begun and its headers are not complete yet
        self._message_complete = True
        self._over = False  # opened over the cap: answered 503 unless it asks for /health
        self._tracked = False

    # ---- the connection's life ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        table = self.table
        if len(table) >= table.limits.max_connections and not table.evict_oldest_sender():
            if len(table) >= table.limits.ceiling:
                table.on_close("refused")
                transport.abort()
                return
            self._over = True
        table.open.add(self)
        self._tracked = True
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._untrack()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        self._untrack()  # the WebSocket protocol owns the transport from here
        super().handle_websocket_upgrade()

    def _untrack(self) -> None:
        self._cancel_deadline()
        if self._tracked:
            self._tracked = False
            self.table.open.discard(self)
            self.table.waiting.pop(self, None)
            self.table.receiving.pop(self, None)

    def close_guarded(self, reason: str, response: bytes = b"") -> None:
        """Close this connection for ``reason`` (counted), after ``response`` if any."""
        self._untrack()
        self.table.on_close(reason)
        if not self.transport.is_closing():
            if response:
                self.transport.write(response)
            self.transport.close()

    # ---- deadlines ----------------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(seconds, callback)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _await_request(self) -> None:
        """Waiting for a request's headers: evictable, and on the header deadline."""
        self.table.waiting[self] = None
        self.table.waiting.move_to_end(self)
        timeout = min(self.table.limits.header_timeout, OVER_CAP_HEADER_TIMEOUT) if self._over else None
        self._arm(timeout or self.table.limits.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._deadline = None
        timeout = self.table.limits.header_timeout
        if self._over:
            timeout = min(timeout, OVER_CAP_HEADER_TIMEOUT)
        self.close_guarded("header_timeout", _timeout_response("headers", timeout) if self._begun else b"")

    def _body_late(self) -> None:
        self._deadline = None
        self.end_request("body_timeout", _timeout_response("body", self.table.limits.body_timeout))

    def end_request(self, reason: str, response: bytes) -> None:
        """Close a connection whose request is running but still receiving its body: ``response``
        unless one has started; the route reading the body sees a client that left, and its answer,
        if it ever comes, goes nowhere."""
        cycle = self.cycle
        if cycle is not None:
            if cycle.response_started:
                response = b""
            cycle.disconnected = True
            cycle.message_event.set()
        self.close_guarded(reason, response)

    # ---- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._begun = False
        self.table.waiting.pop(self, None)
        self._cancel_deadline()
        self._message_complete = False
        if self._over:
            app = self.app
            self.app = _over_cap(app, self.table)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        if not self.pipeline:  # a pipelined request's body is read (and timed) once it starts
            self._receive_body()

    def _receive_body(self) -> None:
        """The running request's body is still to come: evictable, and on the body deadline."""
        if not self._message_complete and self._tracked:
            self.table.receiving[self] = None
            self._arm(self.table.limits.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._message_complete = True
        self.table.receiving.pop(self, None)
        self._cancel_deadline()
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:  # uvicorn's own ASGI types
        """Run the request, telling the client when its connection will not be kept: a response
        that starts before the request's body is all in (a 401, a 413, a 404) closes the connection
        (:meth:`on_response_complete`), and without ``Connection: close`` a keep-alive client sent
        its next request into a closed socket."""
        send = cycle.send

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False  # uvicorn then writes `connection: close` and closes
            await send(message)

        cycle.send = closing_send
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # else the request answered is the last one parsed
        if not pipelined and not self._message_complete and self._tracked:
            # answered before its body was all in: the rest is not wanted, and reading it would let
            # a slow body keep the connection
            self.close_guarded("unread_body")
        super().on_response_complete()
        if self.transport.is_closing() or not self._tracked:
            return
        if self._over:
            self.transport.close()
        elif pipelined:
            self._receive_body()  # the pipelined request that starts now
        elif self.timeout_keep_alive_task is not None:
            self._await_request()  # idle: the next request's headers are on the deadline again


def _over_cap(app: ASGIApp, table: ConnectionTable) -> Any:
    """The app for a request that came over the cap: ``/health`` as usual, everything else a 503."""
    body = orjson.dumps(_busy(table.limits.max_connections).body())

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") == "/health":
            await app(scope, receive, send)
            return
        table.on_close("over_cap")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return refuse


def guarded_protocol(limits: ConnectionLimits, on_close: Callable[[str], None]) -> type[GuardedHttpProtocol]:
    """A protocol class for one server (``uvicorn.Config(http=...)``) with its own table."""
    table = ConnectionTable(limits, on_close)
    return type("KVProxyHttpProtocol", (GuardedHttpProtocol,), {"table": table})
