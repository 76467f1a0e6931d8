"""Deployments: the model name clients use, its primary, its reference, and its shadow path.

Two kinds share the shadow machinery (sampler, bounded queue, tracker) and the status shape:
:class:`EmbeddedDeployment` (llama.cpp in process, exact scoring on the same weights) and
:class:`HttpDeployment` (llama-server replicas for the primary; the reference either a plain
llama-server, scored per position from its top-K, or a kvproxy scoring server, scored exactly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.backends.embedded_scorer import ThreadedScorer
from kvproxy.backends.llama_server import (
    LlamaServerPrimary,
    LlamaServerReference,
    prompt_tokens_chat,
    prompt_tokens_text,
)
from kvproxy.backends.score_client import ScoreRouteReference, probe_score_route
from kvproxy.baseline import read_baseline
from kvproxy.config import KVCacheType, Settings
from kvproxy.deploy_config import DeploymentSpec, DriftSpec, ProxyConfig
from kvproxy.drift import DriftDetector
from kvproxy.gguf_info import ModelInfo
from kvproxy.guard import Guard
from kvproxy.history import KLDHistory
from kvproxy.kld import PositionScores
from kvproxy.memory import KV_MEMORY_FIELDS, kv_memory_summary
from kvproxy.metrics import ServingObserver
from kvproxy.quality import QualityTracker
from kvproxy.shadow import ShadowDirective, ShadowJob, ShadowPool, ShadowSampler, ShadowTicket
from kvproxy.tasks import cancel_and_wait
from kvproxy.upstream import ReplicaPool, Timeouts, UpstreamError

log = logging.getLogger(__name__)


def _kv_dict(kv: KVConfig | None) -> dict[str, str] | None:
    if kv is None:
        return None
    return {"cache_type_k": kv.cache_type_k.value, "cache_type_v": kv.cache_type_v.value}


@dataclass
class DeploymentBase:
    name: str
    primary_kv: KVConfig | None
    reference_kv: KVConfig | None
    sampler: ShadowSampler
    tracker: QualityTracker
    pool: ShadowPool = field(init=False)
    serving_metrics: ServingObserver | None = field(default=None, init=False)
    drift: DriftDetector = field(default_factory=DriftDetector, init=False)
    guard: Guard | None = field(default=None, init=False)
    probes: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    history: KLDHistory = field(default_factory=KLDHistory, init=False)
    requests: int = field(default=0, init=False)  # requests that reached generation (shadow coverage)

    estimator: str = "exact"

    def configure_drift(self, spec: DriftSpec) -> None:
        """The detector from the deployments file: armed from a calibration baseline, or warming up."""
        self.drift = DriftDetector(warmup=spec.warmup, h=spec.threshold, k=spec.allowance)
        if spec.baseline is not None:
            b = read_baseline(spec.baseline, self.primary_kv, default_log_sigma=spec.log_sigma)
            self.drift.arm(b.mean_kld, b.log_sigma)

    @property
    def model_label(self) -> str:
        """The model behind the deployment, for metrics: the GGUF's name in process, else the
        deployment's own name (a llama-server's model is whatever it was started with)."""
        return self.name

    def on_scored(self, scores: PositionScores) -> None:
        """After every scored job: the KLD-over-time series, then the drift detector."""
        self.history.record(self.tracker)
        self.observe_drift(scores)

    def observe_drift(self, scores: PositionScores) -> None:
        """Feed one scored request's mean KLD to the drift detector; log every change of state."""
        changed = self.drift.update(float(np.mean(scores.kld)))
        if changed is not None:
            log.warning(
                "deployment %s: drift state %s (statistic %.2f)", self.name, changed, self.drift.statistic
            )
            if self.serving_metrics is not None:
                self.serving_metrics.drift_transition(changed)
        self.guard_active()

    def guard_active(self) -> bool:
        """Whether traffic goes to the fallback now; moves the guard (hold time, drift state) first."""
        if self.guard is None:
            return False
        switched = self.guard.evaluate(self.drift.state, time.monotonic())
        if switched is not None:
            target = self.guard.fallback if self.guard.active else self.name
            log.warning(
                "deployment %s: guard switched to the %s (%s); drift state %s",
                self.name,
                switched,
                target,
                self.drift.state,
            )
            if self.serving_metrics is not None:
                self.serving_metrics.guard_switch(switched)
        return self.guard.active

    async def cancel_probes(self) -> None:
        await cancel_and_wait(list(self.probes))

    def ticket(self, directive: ShadowDirective | None) -> ShadowTicket | None:
        """Called once per request that reaches generation (each kind's serving code does)."""
        self.requests += 1
        return self.pool.ticket(directive) if self.sampler.decide(directive) else None

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def backend_status(self) -> dict[str, Any]:
        return {}

    def memory_status(self) -> dict[str, Any] | None:
        """KV bytes of the primary config against f16 (kvproxy.memory). Without the model's attention
        shape (a llama-server primary) only the config is known: the figures are null."""
        if self.primary_kv is None:
            return None
        kv = self.primary_kv
        return {
            "cache_type_k": kv.cache_type_k.value,
            "cache_type_v": kv.cache_type_v.value,
            **self._kv_figures(),
        }

    def _kv_figures(self) -> dict[str, Any]:
        """The figures of :data:`KV_MEMORY_FIELDS`; a deployment that knows its model computes them."""
        return dict.fromkeys(KV_MEMORY_FIELDS)

    def _coverage(self) -> dict[str, Any]:
        c = self.pool.counters
        return {
            "requests": self.requests,
            "sampled_fraction": c.sampled / self.requests if self.requests else None,
            "scored_fraction": c.scored / self.requests if self.requests else None,
        }

    def status(self) -> dict[str, Any]:
        c = self.pool.counters
        return {
            "name": self.name,
            "ready": self.ready,
            "primary": _kv_dict(self.primary_kv),
            "reference": _kv_dict(self.reference_kv),
            "estimator": self.estimator,
            **self.backend_status(),
            "drift": self.drift.status(),
            "guard": None
            if self.guard is None
            else {**self.guard.status(time.monotonic()), "probes_in_flight": len(self.probes)},
            "shadow": {
                "rate": self.sampler.rate,
                "sampled": c.sampled,
                "scored": c.scored,
                "dropped": c.dropped,
                "failed": c.failed,
                "shed": c.shed,
                "queued": self.pool.queued,
                "in_flight": self.pool.in_flight,
                "scored_tokens": c.scored_tokens,
                "last_lag_seconds": c.last_lag_seconds,
                "coverage": self._coverage(),
            },
            "kld": {
                "since_start": self.tracker.since_start().as_dict(),
                "recent": {"window_tokens": self.tracker.window, **self.tracker.recent().as_dict()},
            },
            "memory": self.memory_status(),
            "history": self.history.as_list(),
            "histogram": self.tracker.histogram(),
        }


@dataclass
class EmbeddedDeployment(DeploymentBase):
    backend: EmbeddedBackend = field(kw_only=True)
    scorer: ThreadedScorer = field(kw_only=True)
    queue_size: int = field(default=64, kw_only=True)

    def __post_init__(self) -> None:
        self.pool = ShadowPool(
            self.scorer, self.tracker, queue_size=self.queue_size, concurrency=1, on_scored=self.on_scored
        )

    @property
    def ready(self) -> bool:
        return self.backend.ready

    @property
    def model_label(self) -> str:
        return self.backend.info.name

    def _kv_figures(self) -> dict[str, Any]:
        b = self.backend
        return kv_memory_summary(
            b.info.attention, b.kv.cache_type_k, b.kv.cache_type_v, b.n_ctx, n_ubatch=b.n_ubatch
        )

    async def start(self) -> None:
        """Load the model, then the scoring contexts on the same weights, then start the workers."""
        await self.backend.load()
        await self.scorer.start()
        self.pool.start()

    async def stop(self) -> None:
        await self.cancel_probes()
        await self.pool.stop()

    def close(self) -> None:
        self.scorer.close()  # scoring contexts go before the model they share
        self.backend.close()


def embedded_deployment(
    settings: Settings, info: ModelInfo, backend: EmbeddedBackend | None = None
) -> EmbeddedDeployment:
    """The zero-configuration deployment: primary and exact scorer in process on one set of weights."""
    backend = backend or EmbeddedBackend(settings, info)
    reference = KVConfig(settings.reference_cache_type, settings.reference_cache_type)
    return EmbeddedDeployment(
        name=backend.model_name,
        primary_kv=backend.kv,
        reference_kv=reference,
        sampler=ShadowSampler(settings.shadow_rate),
        tracker=QualityTracker(window=settings.status_window),
        backend=backend,
        scorer=ThreadedScorer(lambda: backend.make_scorer(reference)),
        queue_size=settings.shadow_queue_size,
    )


class HttpScorer:
    """Scores an HTTP primary's job: the primary tokenizes the prompt, the reference scores."""

    def __init__(self, deployment: HttpDeployment) -> None:
        self.deployment = deployment

    async def score(self, job: ShadowJob) -> PositionScores:
        d = self.deployment
        reference = await d.resolve_reference()
        source = job.source or {}
        if "messages" in source:
            prompt = await prompt_tokens_chat(d.primary_pool, source["messages"])
        else:
            prompt = await prompt_tokens_text(d.primary_pool, source.get("prompt", ""))
        return await reference.score(prompt, job.report)


@dataclass
class HttpDeployment(DeploymentBase):
    primary_pool: ReplicaPool = field(kw_only=True)
    reference_pool: ReplicaPool | None = field(kw_only=True)
    top_k: int = field(default=20, kw_only=True)
    queue_size: int = field(default=64, kw_only=True)
    concurrency: int = field(default=1, kw_only=True)
    reference: LlamaServerReference | ScoreRouteReference | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.primary = LlamaServerPrimary(self.primary_pool, top_k=self.top_k)
        self.pool = ShadowPool(
            HttpScorer(self),
            self.tracker,
            queue_size=self.queue_size,
            concurrency=self.concurrency,
            on_scored=self.on_scored,
        )
        if self.reference_pool is None:
            self.sampler = ShadowSampler(0.0)
        self.estimator = "undetermined" if self.reference_pool is not None else "none"

    @property
    def ready(self) -> bool:
        return any(r.healthy for r in self.primary_pool.replicas)

    async def start(self) -> None:
        self.primary_pool.start()
        await self.primary_pool.check_health()
        if self.reference_pool is not None:
            self.reference_pool.start()
            with contextlib.suppress(*UpstreamError):
                await self.resolve_reference()
        self.pool.start()

    async def resolve_reference(self) -> LlamaServerReference | ScoreRouteReference:
        """Which kind of reference this is: a kvproxy scoring server answers ``/kvproxy/v1/info``,
        a plain llama-server says 404. Asked at start-up and, if the reference could not be reached
        then, again before the first job (a connection error fails that job and is asked again)."""
        if self.reference is not None:
            return self.reference
        assert self.reference_pool is not None
        info = await probe_score_route(self.reference_pool)
        if info is not None:  # a kvproxy scoring server: exact scores of both configs
            self.reference = ScoreRouteReference(self.reference_pool, info)
            self.estimator = "exact"
            self.reference_kv = info.reference_kv
        else:
            self.reference = LlamaServerReference(self.reference_pool, top_k=self.top_k)
            self.estimator = f"top-{self.top_k}"
        return self.reference

    async def stop(self) -> None:
        await self.cancel_probes()
        await self.pool.stop()
        await self.primary_pool.close()
        if self.reference_pool is not None:
            await self.reference_pool.close()

    def close(self) -> None:
        pass

    def backend_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"primary_replicas": self.primary_pool.status()}
        if self.reference_pool is not None:
            out["reference_replicas"] = self.reference_pool.status()
            out["reference_kind"] = (
                "kvproxy-score" if isinstance(self.reference, ScoreRouteReference) else "llama-server"
            )
        if isinstance(self.reference, ScoreRouteReference):
            out["replica_consistency"] = self.reference.consistency()
        return out


Deployment = EmbeddedDeployment | HttpDeployment


def http_deployment(spec: DeploymentSpec, *, window: int = 4096) -> HttpDeployment:
    """A deployment served by llama-server replicas (and scored on its reference, if any)."""
    timeouts = Timeouts(spec.timeouts.connect, spec.timeouts.read, spec.timeouts.total)
    ref = spec.reference
    d = HttpDeployment(
        name=spec.model,
        primary_kv=spec.primary.kv(),
        reference_kv=ref.kv(KVCacheType.F16) if ref else None,
        sampler=ShadowSampler(spec.shadow_rate),
        tracker=QualityTracker(window=window),
        primary_pool=ReplicaPool(
            spec.primary.urls, timeouts, health_interval=spec.health_interval, api_key=spec.primary.api_key()
        ),
        reference_pool=ReplicaPool(
            ref.urls, timeouts, health_interval=spec.health_interval, api_key=ref.api_key()
        )
        if ref
        else None,
        top_k=spec.top_k,
        queue_size=spec.queue_size,
        concurrency=spec.concurrency,
    )
    configure(d, spec)
    return d


def configure(d: Deployment, spec: DeploymentSpec) -> None:
    """What every kind of deployment takes from its file entry: the drift detector and the guard."""
    d.configure_drift(spec.drift)
    if spec.guard is not None:
        g = spec.guard
        d.guard = Guard(g.fallback, g.min_hold_seconds, probe_concurrency=g.probe_concurrency)


def build_deployments(config: ProxyConfig, settings: Settings) -> list[Deployment]:
    """Every deployment of a deployments file; an embedded one takes its model from ``settings``."""
    out: list[Deployment] = []
    for spec in config.deployments:
        if spec.primary.embedded:
            s = settings.model_copy(
                update={
                    "alias": spec.model,
                    "cache_type_k": spec.primary.cache_type_k or settings.cache_type_k,
                    "cache_type_v": spec.primary.cache_type_v
                    or spec.primary.cache_type_k
                    or settings.cache_type_v,
                    "shadow_rate": spec.shadow_rate,
                    "shadow_queue_size": spec.queue_size,
                }
            )
            from kvproxy.backends.embedded import resolve_model_path
            from kvproxy.gguf_info import read_model_info

            d = embedded_deployment(s, read_model_info(resolve_model_path(s.model)))
            configure(d, spec)
            out.append(d)
        else:
            out.append(http_deployment(spec, window=settings.status_window))
    return out
