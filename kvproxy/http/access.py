"""Who may call what: API keys for the serving routes, a separate token for status and metrics.

Three kinds of route:

* serving (``/v1/*`` and its unprefixed aliases; a scoring server's ``/kvproxy/v1/score`` and
  ``/info``, which carry prompt tokens; ``/kvproxy/v1/scores/{id}``, the per-token scores of a
  client's own response, kept at its request): any of the API keys, when keys are configured;
* admin (the rest of ``/kvproxy/*``, and ``/metrics``): the admin token, when one is configured.
  An API key does not open them: a client's key should not read the fleet's metrics, and a
  Prometheus token should not buy completions;
* public: ``/health`` (orchestrators probe it without secrets), the quality page and the API docs.

A presented key is compared with every configured one through SHA-256 digests and
``hmac.compare_digest``: the time taken does not depend on which key matched, on how much of one
matched, or on the length of what was sent. No key, valid or not, is ever logged or echoed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from kvproxy.errors import OpenAIError, error_response

SCORING_ROUTES = frozenset({"/kvproxy/v1/score", "/kvproxy/v1/info"})
# the OpenAI routes without their /v1 prefix, as llama-server serves them (kvproxy.api.openai)
OPENAI_ALIASES = ("/chat/completions", "/completions", "/responses", "/models", "/embeddings")
_UNDER_ALIASES = tuple(a + "/" for a in OPENAI_ALIASES)


class RouteKind(enum.Enum):
    PUBLIC = "public"
    SERVING = "serving"
    ADMIN = "admin"


def route_kind(path: str) -> RouteKind:
    if path.startswith(("/v1/", "/kvproxy/v1/scores/")) or path == "/v1" or path in SCORING_ROUTES:
        return RouteKind.SERVING
    if path in OPENAI_ALIASES or path.startswith(_UNDER_ALIASES):
        return RouteKind.SERVING
    if path.startswith("/kvproxy/") or path == "/metrics":
        return RouteKind.ADMIN
    return RouteKind.PUBLIC


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


class KeySet:
    """Secrets kept only as digests; ``matches`` runs in the same time whatever it is given."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self._digests = [_digest(s) for s in secrets if s]  # an unset secret guards nothing

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, presented: bytes) -> bool:
        return self.match(presented) is not None

    def match(self, presented: bytes) -> bytes | None:
        """The digest of the key matched (who the caller is, never the key), or None."""
        given = _digest(presented)
        found = False
        for d in self._digests:  # no early exit: every key is compared every time
            found |= hmac.compare_digest(given, d)
        return given if found else None


def key_owner(scope: Scope) -> bytes | None:
    """Which API key the request came with (its digest), as AccessControl noted it; None when the
    serving routes are open. Kept per-token scores belong to it (kvproxy.shadow.token_scores)."""
    owner: bytes | None = (scope.get("state") or {}).get(_OWNER)
    return owner


_OWNER = "kvproxy_api_key_digest"


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The credential of an ``Authorization: Bearer <token>`` header, if there is one."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def refusal(kind: RouteKind, *, presented: bool) -> OpenAIError:
    """The 401 for a missing or a wrong secret; it never repeats what was sent."""
    serving = kind is RouteKind.SERVING
    what = "API key" if serving else "admin token"
    if presented:
        return OpenAIError(
            401, f"Incorrect {what} provided.", code="invalid_api_key" if serving else "invalid_admin_token"
        )
    return OpenAIError(
        401,
        f"You didn't provide {'an' if serving else 'the'} {what}. "
        "Send it in an Authorization header: `Authorization: Bearer KEY`.",
        code="missing_api_key" if serving else "missing_admin_token",
    )


class AccessControl:
    """Pure ASGI middleware: refuses with 401 (OpenAI's error body) before anything reads the body."""

    def __init__(self, app: ASGIApp, api_keys: KeySet, admin_token: KeySet) -> None:
        self.app = app
        self.keys = {RouteKind.SERVING: api_keys, RouteKind.ADMIN: admin_token}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            kind = route_kind(scope["path"])
            keys = self.keys.get(kind)
            if keys:
                token = bearer_token(scope["headers"])
                owner = keys.match(token) if token is not None else None
                if owner is None:
                    err = refusal(kind, presented=token is not None)
                    response = error_response(err)
                    response.headers["www-authenticate"] = "Bearer"
                    await response(scope, receive, send)
                    return
                if kind is RouteKind.SERVING:
                    scope.setdefault("state", {})[_OWNER] = owner
        await self.app(scope, receive, send)
