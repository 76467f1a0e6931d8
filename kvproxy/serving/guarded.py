"""Serving for a guarded deployment: its own serving logic, or its fallback's while in drift.

While the guard is active, the client is answered by the fallback deployment (one hop: the
fallback's own guard is not followed), and requests the primary's sampler picks are replayed on the
drifting primary in the background (non-streaming, shadow forced) so that its shadow scoring, and
therefore its recovery, stays observed. Probes never touch the client's response: they run after it
is chosen, are bounded by ``probe_concurrency`` (extra ones are skipped and counted), and their
failures are counted and logged only. Every response of a guarded deployment names who served it in
``X-KVProxy-Served-By``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi.responses import Response

from kvproxy.deployments.base import DeploymentBase
from kvproxy.serving.base import Kind, Serving, handler
from kvproxy.shadow.ask import ShadowAsk

log = logging.getLogger(__name__)

SERVED_BY_HEADER = "X-KVProxy-Served-By"


class GuardedServing:
    def __init__(self, deployment: DeploymentBase, primary: Serving, fallback: Serving) -> None:
        assert deployment.guard is not None
        self.deployment = deployment
        self.guard = deployment.guard
        self.primary = primary
        self.fallback = fallback

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        return await self._serve("chat", raw, body, shadow)

    async def handle_completion(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        return await self._serve("completion", raw, body, shadow)

    async def handle_responses(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        return await self._serve("responses", raw, body, shadow)

    async def handle_other(self, path: str, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        """Routes kvproxy does not serve itself (embeddings, ...) are not generation: the guard
        does not apply, the deployment's own serving answers."""
        response: Response = await self.primary.handle_other(path, raw, body, shadow)
        response.headers[SERVED_BY_HEADER] = self.deployment.name
        return response

    async def _serve(self, kind: Kind, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        d = self.deployment
        d.step_guard()
        if not self.guard.active:
            response: Response = await handler(self.primary, kind)(raw, body, shadow)
            response.headers[SERVED_BY_HEADER] = d.name
            return response
        if d.shadow.sampler.decide(shadow.directive) and not d.shadow.pool.saturated:
            self._probe(kind, body, shadow.forced())
        response = await handler(self.fallback, kind)(raw, body, shadow)
        response.headers[SERVED_BY_HEADER] = self.guard.fallback
        return response

    def _probe(self, kind: Kind, body: dict[str, Any], ask: ShadowAsk) -> None:
        d = self.deployment
        if len(d.probes) >= self.guard.probe_concurrency:
            self._count("skipped")
            return
        probe = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        task = asyncio.create_task(self._run_probe(kind, probe, ask), name=f"kvproxy-probe-{d.name}")
        d.probes.add(task)
        task.add_done_callback(d.probes.discard)
        self._count("started")

    async def _run_probe(self, kind: Kind, body: dict[str, Any], ask: ShadowAsk) -> None:
        try:
            await handler(self.primary, kind)(json.dumps(body).encode(), body, ask)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an OpenAIError from the primary, a network error: count, go on
            self._count("failed")
            log.info("deployment %s: probe on the primary failed: %s", self.deployment.name, exc)

    def _count(self, outcome: str) -> None:
        self.guard.probes[outcome] += 1
        self.deployment.events.guard_probe(outcome)
