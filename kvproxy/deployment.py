"""A deployment: the model name clients use, its primary backend, its reference, and its shadow path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.backends.embedded_scorer import ThreadedScorer
from kvproxy.config import Settings
from kvproxy.gguf_info import ModelInfo
from kvproxy.quality import QualityTracker
from kvproxy.shadow import ShadowPool, ShadowSampler


@dataclass
class Deployment:
    backend: EmbeddedBackend
    reference_kv: KVConfig
    sampler: ShadowSampler
    tracker: QualityTracker
    pool: ShadowPool
    scorer: ThreadedScorer
    estimator: str = (
        "exact"  # exact full-vocabulary KLD (embedded); "top-K" estimators come with HTTP backends
    )

    @property
    def name(self) -> str:
        return self.backend.model_name

    async def start(self) -> None:
        """Load the model, then the scoring contexts on the same weights, then start the workers."""
        await self.backend.load()
        await self.scorer.start()
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    def close(self) -> None:
        self.scorer.close()  # scoring contexts go before the model they share
        self.backend.close()

    def status(self) -> dict[str, Any]:
        c = self.pool.counters
        return {
            "name": self.name,
            "ready": self.backend.ready,
            "primary": _kv_dict(self.backend.kv),
            "reference": _kv_dict(self.reference_kv),
            "estimator": self.estimator,
            "shadow": {
                "rate": self.sampler.rate,
                "sampled": c.sampled,
                "scored": c.scored,
                "dropped": c.dropped,
                "failed": c.failed,
                "queued": self.pool.queued,
                "in_flight": self.pool.in_flight,
                "scored_tokens": c.scored_tokens,
                "last_lag_seconds": c.last_lag_seconds,
            },
            "kld": {
                "since_start": self.tracker.since_start().as_dict(),
                "recent": {"window_tokens": self.tracker.window, **self.tracker.recent().as_dict()},
            },
        }


def _kv_dict(kv: KVConfig) -> dict[str, str]:
    return {"cache_type_k": kv.cache_type_k.value, "cache_type_v": kv.cache_type_v.value}


def embedded_deployment(
    settings: Settings, info: ModelInfo, backend: EmbeddedBackend | None = None
) -> Deployment:
    """The zero-configuration deployment: primary and exact scorer in process on one set of weights."""
    backend = backend or EmbeddedBackend(settings, info)
    reference = KVConfig(settings.reference_cache_type, settings.reference_cache_type)
    tracker = QualityTracker(window=settings.status_window)
    scorer = ThreadedScorer(lambda: backend.make_scorer(reference))
    return Deployment(
        backend=backend,
        reference_kv=reference,
        sampler=ShadowSampler(settings.shadow_rate),
        tracker=tracker,
        pool=ShadowPool(scorer, tracker, queue_size=settings.shadow_queue_size, concurrency=1),
        scorer=scorer,
    )
