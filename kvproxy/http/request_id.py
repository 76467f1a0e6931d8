"""``x-request-id`` on every response, as OpenAI sends one: clients log it, users quote it.

A client's own ``x-request-id`` is kept when it is sane (1 to 128 printable ASCII characters, no
spaces); otherwise kvproxy makes one, ``req_`` and 32 hex digits. The id is on the response's
headers (errors and streams included), on the access log line (logger ``kvproxy.http.access``, at debug
level: ``--log-level debug``), and on the request's shadow job, so a failed scoring in the log names
the request it came from.

Pure ASGI middleware, outermost: one header added to ``http.response.start``, nothing else read.
"""

from __future__ import annotations

import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
MAX_LENGTH = 128
_STATE_KEY = "kvproxy_request_id"

access_log = logging.getLogger("kvproxy.access")


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()


def sane(value: bytes) -> bool:
    """1 to MAX_LENGTH visible ASCII characters (``!`` to ``~``): safe in a log line and a header."""
    return 0 < len(value) <= MAX_LENGTH and all(0x21 <= b <= 0x7E for b in value)


def client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if sane(value) else None
    return None


def request_id(scope: Scope) -> str | None:
    """The id RequestId gave this request (None outside it)."""
    found: str | None = (scope.get("state") or {}).get(_STATE_KEY)
    return found


class RequestId:
    """Pure ASGI middleware: the request's id on its response, its log line and its shadow job."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = client_request_id(scope["headers"]) or new_request_id()
        scope.setdefault("state", {})[_STATE_KEY] = rid
        header = (REQUEST_ID_HEADER, rid.encode("ascii"))
        status = 500
        logging_on = access_log.isEnabledFor(logging.DEBUG)
        start = time.perf_counter() if logging_on else 0.0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if logging_on:
                access_log.debug(
                    '%s "%s %s" %d %.1f ms request_id=%s',
                    _client(scope),
                    scope.get("method", ""),
                    scope.get("path", ""),
                    status,
                    (time.perf_counter() - start) * 1000,
                    rid,
                )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
