"""The two hot routes, served straight from ASGI in front of FastAPI's router.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are what every client request hits. Through
FastAPI's router, its exception and exit-stack middleware, the request/response wrapper and the
dependency solver, the framework cost more CPU than the whole relay (py-spy at concurrency 1: about
half of the proxy's time in those layers, 9 % in kvproxy's handler). This middleware answers the
same two routes with the same function (``kvproxy.api.openai.complete``) and the same error bodies, and hands
every other request to FastAPI. The FastAPI routes stay declared: they document the API (OpenAPI) and
define the route objects the metrics label requests by.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import Response
from starlette.requests import Request

from kvproxy.api.openai import complete
from kvproxy.errors import OpenAIError, error_response, unexpected_error
from kvproxy.router import Router

log = logging.getLogger(__name__)


class OpenAIFastPath:
    def __init__(self, app: Any, router: Router, routes: dict[str, Any]) -> None:
        self.app = app
        self.router = router
        self.routes = routes  # path -> FastAPI's route object, for the metrics' route label

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.routes:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes[path]
        response = await self._respond(path, Request(scope, receive))
        await response(scope, receive, send)

    async def _respond(self, path: str, request: Request) -> Response:
        try:
            return await complete(self.router, path, request)
        except OpenAIError as exc:
            return error_response(exc)
        except Exception as exc:  # the answer FastAPI's handler gives (kvproxy.errors)
            log.exception("unexpected error on %s", path)
            return error_response(unexpected_error(exc))
