"""The two hot routes, served straight from ASGI in front of FastAPI's router.

``POST /v1/chat/completions`` and ``POST /v1/completions`` are what every client request hits. Through
FastAPI's router, its exception and exit-stack middleware, the request/response wrapper and the
dependency solver, the framework cost more CPU than the whole relay (py-spy at concurrency 1: about
half of the proxy's time in those layers, 9 % in kvproxy's handler). This middleware answers the
same two routes with the same handlers (``kvproxy.api.openai``) and the same error bodies, and hands
every other request to FastAPI. The FastAPI routes stay declared: they document the API (OpenAPI) and
define the route objects the metrics label requests by.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from kvproxy.api.openai import json_body
from kvproxy.errors import OpenAIError
from kvproxy.router import Router
from kvproxy.serving import shadow_directive
from kvproxy.shadow import SHADOW_HEADER

log = logging.getLogger(__name__)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


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
            raw, body = await json_body(request)
            serving = self.router.route(body.get("model"))
            shadow = shadow_directive(request.headers.get(SHADOW_HEADER))
            if path == CHAT:
                return await serving.handle_chat(raw, body, shadow)
            return await serving.handle_completion(raw, body, shadow)
        except OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except Exception as exc:  # the same answer FastAPI's handler gives (kvproxy.errors)
            log.exception("unexpected error on %s", path)
            err = OpenAIError(500, f"Internal error: {type(exc).__name__}", type="server_error")
            return JSONResponse(err.body(), status_code=500)
