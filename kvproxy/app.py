"""The application factory: wires deployments, the router and the routes together.

The server starts listening at once and loads embedded models in the background, so ``/health`` can
say 503 while loading (as llama-server does) and orchestrators see a live process from the start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from kvproxy import __version__
from kvproxy.api import admin, health, openai, score, ui
from kvproxy.api import whatif as whatif_api
from kvproxy.api.fast_path import OpenAIFastPath
from kvproxy.api.openai import GENERATION_PATHS
from kvproxy.config import DEFAULT_MAX_TOKENS
from kvproxy.deployments.build import Deployment
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.errors import install_error_handlers
from kvproxy.http.access import AccessControl, KeySet
from kvproxy.http.body_limit import BodyLimit
from kvproxy.http.cors import CORS
from kvproxy.http.draining import DrainCutoff
from kvproxy.http.request_id import RequestId
from kvproxy.protocol import ChatCompletionRequest, CompletionRequest
from kvproxy.protocol_responses import ResponsesRequest
from kvproxy.serving.router import Router
from kvproxy.shadow.token_scores import TokenScoreStore
from kvproxy.telemetry.gpu import GpuCollector, GpuMonitor
from kvproxy.telemetry.metrics import Metrics, RequestMetricsMiddleware, default_metrics

log = logging.getLogger(__name__)


class KVProxyApp(FastAPI):
    """FastAPI with kvproxy's own pure-ASGI layers (metrics, access, body limit, the fast path) in
    front of Starlette's error and telemetry middleware rather than inside them.

    The two completion routes are answered by the fast path, which maps every exception to an
    OpenAI error itself; passing them through Starlette's outer layers first cost CPU on every
    request for nothing (docs/benchmarks.md). Every other route still gets the whole FastAPI stack.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.front: list[tuple[type, dict[str, Any]]] = []

    def build_middleware_stack(self) -> Any:
        app = super().build_middleware_stack()
        for cls, options in reversed(self.front):
            app = cls(app, **options)
        return app


def create_app(
    deployments: Deployment | list[Deployment],
    *,
    on_ready: Callable[[], None] | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
    metrics: Metrics | None = None,
    gpu: GpuMonitor | None = None,
    api_keys: Sequence[str] = (),
    admin_token: str | None = None,
    max_body_bytes: int = 4 * 2**20,
    drain_timeout: float = 30.0,
    max_tokens_default: int = DEFAULT_MAX_TOKENS,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """Build the ASGI app; its lifespan starts (loads) and stops every deployment.

    ``metrics``: what the deployments were built with (kvproxy.deployments.build takes it too), so
    their series and the HTTP ones share a registry; by default a registry of the app's own with the
    process collector (RSS, CPU, open files). ``gpu``: the NVML monitor (a test passes one with its
    own reader); its readings are exported on the same registry. ``api_keys`` guard the serving routes,
    ``admin_token`` the status and metrics routes (kvproxy.http.access); none given: open.
    ``max_tokens_default`` limits requests that set no limit (0: the context's room). ``cors_origins``
    opens the serving routes to browsers on those origins (kvproxy.http.cors); none: CORS off.

    On shutdown, queued and running shadow jobs get until ``app.state.drain_deadline`` (set by the
    server when SIGTERM arrives; else ``drain_timeout`` from the start of shutdown) to finish; what
    is left is counted as dropped, and both counts are logged.
    """
    deps = deployments if isinstance(deployments, list) else [deployments]
    router = Router(deps, max_tokens_default=max_tokens_default)
    metrics = metrics or default_metrics()
    gpu = gpu or GpuMonitor()
    metrics.registry.register(GpuCollector(gpu.latest))

    async def start(d: Deployment) -> None:
        try:
            await d.start()
        except Exception as exc:
            if on_load_failed is not None:  # the CLI says it, in the one line a start-up failure gets
                on_load_failed(exc)
            else:
                log.error("starting deployment %s failed: %s", d.name, exc)
            raise

    async def start_all() -> None:
        results = await asyncio.gather(*(start(d) for d in deps), return_exceptions=True)
        if on_ready is not None and not any(isinstance(r, BaseException) for r in results):
            on_ready()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(start_all(), name="kvproxy-start")
        gpu.start()
        try:
            yield
        finally:
            await gpu.stop()
            await asyncio.shield(loading)  # never free a model while its loader thread runs
            deadline = app.state.drain_deadline or time.monotonic() + drain_timeout
            await asyncio.gather(*(drain_shadow(d, deadline) for d in deps))
            for d in deps:
                await d.stop()
                d.close()

    app = KVProxyApp(title="kvproxy", version=__version__, lifespan=lifespan)
    hot_routes = {
        r.path: r
        for r in [*openai.router.routes, *openai.aliases.routes]
        if isinstance(r, APIRoute) and r.path in GENERATION_PATHS and "POST" in (r.methods or ())
    }
    assert hot_routes.keys() == GENERATION_PATHS.keys(), hot_routes  # the fast path answers them all
    # kvproxy's own ASGI layers, outermost first, in front of Starlette's whole stack (kvproxy.app)
    app.front.append((RequestId, {}))  # every answer carries its x-request-id, a 401 or 413 too
    app.front.append((RequestMetricsMiddleware, {"metrics": metrics}))
    app.front.append((DrainCutoff, {"state": app.state}))  # past the drain deadline: 503, not 500
    if cors_origins:  # preflights are answered before the API-key check (they carry no key)
        app.front.append((CORS, {"origins": list(cors_origins)}))
    if api_keys or admin_token:  # refused before the body is read or limited
        keys = {"api_keys": KeySet(api_keys), "admin_token": KeySet([admin_token])}
        app.front.append((AccessControl, keys))
    app.front.append((BodyLimit, {"limit": max_body_bytes}))
    app.front.append((OpenAIFastPath, {"router": router, "routes": hot_routes}))
    app.state.drain_deadline = None
    app.state.gpu = gpu
    app.state.router = router
    app.state.metrics = metrics
    app.state.deployments = deps
    app.state.token_scores = TokenScoreStore()  # per-token scores kept on request (opt-in header)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(openai.aliases)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(admin.metrics_router)
    app.include_router(ui.router)
    app.include_router(whatif_api.router)
    if any(isinstance(d, EmbeddedDeployment) for d in deps):
        app.include_router(score.router)
    _document_request_bodies(app)
    return app


async def drain_shadow(d: Deployment, deadline: float) -> None:
    """Let queued and running shadow jobs finish until ``deadline``; log what finished and what not."""
    pool = d.shadow.pool
    pending = pool.queued + pool.in_flight
    if not pending:
        return
    before = pool.counters.scored + pool.counters.failed
    log.info(
        "shutdown: %s: %d shadow job(s) pending, waiting up to %.1f s",
        d.name,
        pending,
        deadline - time.monotonic(),
    )
    with suppress(TimeoutError):
        await pool.drain(timeout=max(0.0, deadline - time.monotonic()))
    finished = pool.counters.scored + pool.counters.failed - before
    left = pool.queued + pool.in_flight
    log.log(
        logging.WARNING if left else logging.INFO,
        "shutdown: %s: %d shadow job(s) finished, %d dropped at the drain deadline",
        d.name,
        finished,
        left,
    )


def _document_request_bodies(app: FastAPI) -> None:
    """Request bodies are validated after routing (per deployment kind), so FastAPI does not see
    them; add their schemas to the OpenAPI document by hand."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema(
                [(m, "validation") for m in (ChatCompletionRequest, CompletionRequest, ResponsesRequest)],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["create_app"]
