"""The zero-configuration deployment: primary and exact scorer in process, on one set of weights."""

from __future__ import annotations

from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.backends.devices import Offload
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.deployments.base import DeploymentBase, ShadowOptions
from kvproxy.model.memory import kv_memory_summary
from kvproxy.scoring.scorers import ThreadedScorer
from kvproxy.shadow.guard import Guard
from kvproxy.telemetry.export import export_kv_memory
from kvproxy.telemetry.metrics import Metrics


class EmbeddedDeployment(DeploymentBase):
    def __init__(
        self,
        backend: EmbeddedBackend,
        scorer: ThreadedScorer,
        *,
        reference_kv: KVConfig,
        shadow: ShadowOptions,
        guard: Guard | None = None,
        score_path: str = "decode",
        metrics: Metrics | None = None,
    ) -> None:
        name, kv = backend.model_name, backend.kv
        super().__init__(name, primary_kv=kv, reference_kv=reference_kv, guard=guard, metrics=metrics)
        self.backend = backend
        self.scorer = scorer
        self.score_path = score_path
        self.load_error: str | None = None  # why the model failed to load, once it has
        self._start_shadow(shadow, scorer)
        if metrics is not None:
            self._export(metrics)

    def _export(self, metrics: Metrics) -> None:
        backend = self.backend
        for context, where in self.devices().items():
            metrics.context_device.labels(self.name, context, where.label).set(1)
        # the served context has one KV stream per slot; the scorer's reference context one
        for role, kv, streams in (
            ("primary", self.primary_kv, backend.n_slots),
            ("reference", self.reference_kv, 1),
        ):
            if kv is not None:
                shape, n_ctx = backend.info.attention, backend.n_ctx * streams
                export_kv_memory(metrics, self.name, role, shape, kv, n_ctx, **backend.kv_layout(streams))

    def backends_up(self) -> tuple[tuple[str, str, bool], ...]:
        return (("primary", "embedded", self.backend.ready),)

    def slots(self) -> dict[str, int]:
        return self.backend.slots_status()

    @property
    def ready(self) -> bool:
        return self.backend.ready

    @property
    def model_label(self) -> str:
        return self.backend.info.name

    def devices(self) -> dict[str, Offload]:
        """Where each llama.cpp context computes: the served model and its two scoring contexts
        (which share its weights, so its offload)."""
        where = self.backend.offload
        return {"primary": where, "scorer": where}

    def backend_status(self) -> dict[str, Any]:
        return {
            "devices": {context: str(where) for context, where in self.devices().items()},
            "slots": self.backend.slots_status(),
        }

    def capture_status(self) -> dict[str, int] | None:
        budget = self.backend.capture_budget
        return budget.status() if budget is not None and self.backend.captures else None

    def kv_figures(self) -> dict[str, Any]:
        b = self.backend
        shape, kv = b.info.attention, b.kv
        return kv_memory_summary(
            shape, kv.cache_type_k, kv.cache_type_v, b.n_ctx * b.n_slots, **b.kv_layout(b.n_slots)
        )

    async def start(self) -> None:
        """Load the model, then the scoring contexts on the same weights, then start the workers."""
        try:
            await self.backend.load()
            await self.scorer.start()
        except Exception as exc:
            self.load_error = str(exc)
            raise
        self.shadow.pool.start()

    async def stop(self) -> None:
        await self.cancel_probes()
        await self.shadow.pool.stop()

    def close(self) -> None:
        self.scorer.close()  # scoring contexts go before the model they share
        self.backend.close()
