"""What every kind of serving offers the routes, and the helpers they share.

A serving object takes a request's raw body (for byte-exact relays), its parsed JSON and what the
request asks of the shadow path (kvproxy.shadow.ask, read from its headers by the route), and
returns the HTTP response.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from kvproxy.backends.base import KVConfig
from kvproxy.errors import pydantic_error
from kvproxy.shadow.ask import ShadowAsk

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"


class Serving(Protocol):
    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response: ...

    async def handle_completion(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response: ...

    async def handle_responses(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response: ...

    async def handle_other(self, path: str, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        """A ``/v1`` route kvproxy does not serve itself (``/v1/embeddings``, ...): relayed to a
        llama-server primary, a 404 on the embedded backend."""
        ...


Kind = Literal["chat", "completion", "responses"]  # the generation routes (kvproxy.api.openai)
Handler = Callable[[bytes, dict[str, Any], ShadowAsk], Awaitable[Response]]


def handler(serving: Serving, kind: Kind) -> Handler:
    """The one dispatch from a generation route's kind to a serving's method."""
    if kind == "responses":
        return serving.handle_responses
    return serving.handle_chat if kind == "chat" else serving.handle_completion


_M = TypeVar("_M", bound=BaseModel)


def validated(model: type[_M], body: dict[str, Any]) -> _M:
    """The body as ``model``, or one OpenAI error naming the parameter (never FastAPI's 422)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise pydantic_error(exc) from exc


def system_fingerprint(build: str | None, kv: KVConfig | None) -> str:
    """``system_fingerprint`` of every answer: ``<llama.cpp build>-<cache_type_k>-<cache_type_v>``.

    The build is llama-server's own (its ``/props`` ``build_info``, such as ``b6100-1a2b3c4d``) in
    proxy mode and ``llama-cpp-python-<version>`` embedded; ``unknown`` where it cannot be read (a
    primary that was down at start, an older llama-server). What changes it (another llama.cpp, another
    KV cache type) is what may change the tokens a seed gives."""
    k, v = (kv.cache_type_k.value, kv.cache_type_v.value) if kv is not None else ("unknown", "unknown")
    return f"{build or 'unknown'}-{k}-{v}"


def embedded_build() -> str:
    try:
        return f"llama-cpp-python-{importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
