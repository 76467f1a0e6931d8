"""A ceiling on request bodies: 413 in OpenAI's format before a large body is buffered.

A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked body is
counted as it arrives and refused the moment it passes the limit. Every route reads its body through
``receive``, so the error raised there reaches the client through the route's own error handling
(it is an :class:`~kvproxy.errors.OpenAIError`).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvproxy.errors import OpenAIError, error_response


class BodyTooLarge(OpenAIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than this server accepts ({limit:,} bytes; "
            "KVPROXY_MAX_BODY_BYTES / --max-body-bytes).",
            code="request_too_large",
        )


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimit:
    """Pure ASGI middleware enforcing ``limit`` bytes per request body.

    Once a body passes the limit, whatever the route answers (its own mapping of the error, or
    FastAPI's generic 400 for a body it failed to read) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope["headers"])
        if declared is not None:
            if declared > self.limit:
                await error_response(BodyTooLarge(self.limit))(scope, receive, send)
            else:  # the server's HTTP parser holds the body to its declared length: nothing to count
                await self.app(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False
        limit = self.limit

        async def counting_receive() -> Any:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await error_response(BodyTooLarge(limit))(scope, receive, send)
                return  # the route's own answer to the failed read is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await error_response(BodyTooLarge(limit))(scope, receive, send)
