"""What a request still unanswered at the drain deadline gets: a 503 a client can retry elsewhere.

On SIGTERM uvicorn lets running requests finish for ``--drain-timeout`` seconds, then cancels the
ones left. A request whose answer had not begun (queued for a slot, waiting on a slow upstream) then
got uvicorn's own plain-text ``500 Internal Server Error``: no OpenAI error body for the SDK to read,
and a status that says the server failed rather than "try again". This layer answers it with
OpenAI's shape, ``503`` and ``Retry-After`` (the openai SDK retries on both), and closes the
connection (the server is going away). A response already under way is cut as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvproxy.errors import error_response, server_busy

RETRY_AFTER_S = 1  # another replica (or this one, restarted) can take it at once


def shutting_down() -> Any:
    err = server_busy(
        "The server is shutting down and could not answer this request before its drain deadline; retry it.",
        RETRY_AFTER_S,
        code="server_shutting_down",
    )
    response = error_response(err)
    response.headers["connection"] = "close"
    return response


class DrainCutoff:
    """Pure ASGI middleware: a request cancelled by the shutdown before its answer began gets a 503.

    ``state.drain_deadline`` is set when the exit signal comes (kvproxy.cli.server.DrainClock); a
    cancellation without it (a client that left, a test's server stopping) is passed on unchanged.
    """

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or getattr(self.state, "drain_deadline", None) is None or task is None:
                raise
            task.uncancel()  # the cancellation ends here: this task's last act is the answer
            await shutting_down()(scope, receive, send)
