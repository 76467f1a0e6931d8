"""CORS for browser clients on other origins (``--cors-origin``,
``KVPROXY_CORS_ORIGINS``), off unless set.

Only the serving routes (``/v1/*`` and their unprefixed aliases, a client's kept scores) and
``/health`` are opened: a preflight from an allowed origin is answered here, before the API-key
check (a browser sends no credentials on a preflight), and every answer to an allowed origin carries
``Access-Control-Allow-Origin``, errors included, so the page can read them. The admin routes
(``/kvproxy/*`` but the kept scores, ``/metrics``) are never opened: no CORS header is ever added to
them and their preflights are not answered, so a browser on another origin cannot read them whatever
the configuration. No cookie is involved (keys travel in ``Authorization``), so credentials are not
allowed either. Pure ASGI; not installed at all when no origin is configured.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvproxy.http.access import RouteKind, route_kind

ALLOWED_METHODS = b"GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = b"X-KVProxy-Served-By, X-Request-Id, X-KVProxy-Max-Tokens"
MAX_AGE = b"600"
_HEADER_LIST = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
_DEFAULT_HEADERS = b"authorization, content-type"


def opened(path: str) -> bool:
    """Whether CORS may open this route: the serving routes and /health, never the admin ones."""
    return route_kind(path) is RouteKind.SERVING or path == "/health"


class CORS:
    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(o.encode() for o in origins if o != "*")

    def _allowed(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for this origin, or None."""
        if self.any:
            return b"*"
        return origin if origin in self.origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = request_method = requested_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                request_method = value
            elif name == b"access-control-request-headers":
                requested_headers = value
        allow = self._allowed(origin) if origin is not None and opened(scope["path"]) else None
        if allow is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and request_method is not None:
            await self._preflight(send, allow, requested_headers)
            return
        common = _common_headers(allow)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *common]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Send, allow: bytes, requested_headers: bytes | None) -> None:
        headers = [
            *_common_headers(allow),
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-max-age", MAX_AGE),
            (b"content-length", b"0"),
        ]
        wanted = (requested_headers or b"").strip()
        # the headers the client's SDK sends (authorization, content-type, x-stainless-*, ...):
        # any syntactically valid list is allowed, since the API key is checked on the request itself
        allowed = wanted if wanted and _HEADER_LIST.match(wanted) else _DEFAULT_HEADERS
        headers.append((b"access-control-allow-headers", allowed))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _common_headers(allow: bytes) -> list[tuple[bytes, bytes]]:
    headers = [(b"access-control-allow-origin", allow), (b"access-control-expose-headers", EXPOSED_HEADERS)]
    if allow != b"*":
        headers.append((b"vary", b"Origin"))
    return headers
