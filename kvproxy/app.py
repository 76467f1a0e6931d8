"""The application factory: wires settings, backend, serving logic and routes together.

The server starts listening at once and loads the model in the background, so ``/health`` can say
503 while loading (as llama-server does) and orchestrators see a live process from the start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kvproxy import __version__
from kvproxy.api import admin, health, openai
from kvproxy.deployment import Deployment
from kvproxy.errors import install_error_handlers
from kvproxy.serving import OpenAIServing

log = logging.getLogger(__name__)


def create_app(
    deployment: Deployment,
    *,
    on_ready: Callable[[], None] | None = None,
    on_load_failed: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the ASGI app around ``deployment``, which the app's lifespan loads, starts and closes."""

    async def load() -> None:
        try:
            await deployment.start()
        except Exception as exc:
            log.error("loading %s failed: %s", deployment.backend.info.path, exc)
            serving.load_error = str(exc)
            if on_load_failed is not None:
                on_load_failed(exc)
            return
        if on_ready is not None:
            on_ready()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load(), name="kvproxy-load-model")
        try:
            yield
        finally:
            await asyncio.shield(loading)  # never free the model while the loader thread runs
            await deployment.stop()
            deployment.close()

    app = FastAPI(title="kvproxy", version=__version__, lifespan=lifespan)
    serving = OpenAIServing(deployment)
    app.state.serving = serving
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    return app
