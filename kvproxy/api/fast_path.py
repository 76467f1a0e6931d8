"""The generation routes, served straight from ASGI in front of FastAPI's router.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are what every client request hits (with
``POST /v1/responses`` and the three without their ``/v1`` prefix, answered the same way). Through
FastAPI's router, its exception and exit-stack middleware, the request/response wrapper and the
dependency solver, the framework cost more CPU than the whole relay (py-spy at concurrency 1: about
half of the proxy's time in those layers, 9 % in kvproxy's handler). This middleware answers the
same routes with the same function (``kvproxy.api.openai.complete``) and the same error bodies, and hands
every other request to FastAPI. The FastAPI routes stay declared: they document the API (OpenAPI) and
define the route objects the metrics label requests by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi.responses import Response
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from kvproxy.api.openai import complete
from kvproxy.errors import OpenAIError, error_response, unexpected_error
from kvproxy.http import request_id
from kvproxy.serving.router import Router

log = logging.getLogger(__name__)


CLIENT_CLOSED = 499


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


class OpenAIFastPath:
    def __init__(self, app: ASGIApp, router: Router, routes: dict[str, Any]) -> None:
        self.app = app
        self.router = router
        self.routes = routes  # path -> FastAPI's route object, for the metrics' route label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.routes:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[path]
        response = await self._unless_client_leaves(path, Request(scope, receive), receive)
        if response is None:
            with contextlib.suppress(OSError):  # nobody reads it; counted as 499 (client closed)
                await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
            return
        await response(scope, receive, send)

    async def _unless_client_leaves(self, path: str, request: Request, receive: Receive) -> Response | None:
        """The answer, or None when the client left before it began (a slow upstream, a long
        prefill): the handler is cancelled then, so the upstream request is closed at once rather
        than at its deadline. (Once a stream has begun, Starlette watches for the client itself.)"""
        try:
            await request.body()  # kept by the request; after it, a client's only message is leaving
        except ClientDisconnect:
            return None
        # the handler runs in this task; a watcher task cancels it if the client leaves (one task a
        # request rather than two and an asyncio.wait: this is every request's path)
        this = asyncio.current_task()
        assert this is not None
        answering = [True]  # read when the watcher's callback runs, which may be after we are done

        def client_left(watcher: asyncio.Future[None]) -> None:
            if answering[0] and not watcher.cancelled():
                this.cancel()

        left = asyncio.ensure_future(_disconnected(receive))
        left.add_done_callback(client_left)
        try:
            return await self._respond(path, request)
        except asyncio.CancelledError:
            if left.done() and not left.cancelled() and this.uncancel() == 0:
                return None  # the client left; the cancellation was ours
            raise
        finally:
            answering[0] = False
            left.cancel()

    async def _respond(self, path: str, request: Request) -> Response:
        try:
            return await complete(self.router, path, request)
        except OpenAIError as exc:
            return error_response(exc)
        except Exception as exc:  # the answer FastAPI's handler gives (kvproxy.errors)
            log.exception(
                "unexpected error on %s (request_id=%s)", path, request_id.request_id(request.scope)
            )
            return error_response(unexpected_error(exc))
