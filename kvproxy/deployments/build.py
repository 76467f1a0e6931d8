"""Deployments from settings and the deployments file: the embedded default, llama-server ones."""

from __future__ import annotations

import logging

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import EmbeddedBackend, resolve_model_path
from kvproxy.config import KVCacheType, Settings
from kvproxy.deployments.base import ShadowOptions
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.deployments.http import HttpDeployment
from kvproxy.deployments.spec import (
    BackendSpec,
    DeploymentSpec,
    DriftSpec,
    GuardSpec,
    ProxyConfig,
    ServerSpec,
)
from kvproxy.deployments.whatif import attach as attach_whatif
from kvproxy.deployments.whatif import whatif_scorer
from kvproxy.model.gguf_info import ModelInfo, read_model_info
from kvproxy.model.memory import AttentionShape
from kvproxy.scoring.embedded import make_scorer
from kvproxy.scoring.scorers import ThreadedScorer
from kvproxy.shadow.baseline import read_baseline
from kvproxy.shadow.drift import DriftDetector
from kvproxy.shadow.guard import Guard
from kvproxy.shadow.pool import ShadowSampler
from kvproxy.shadow.quality import QualityTracker
from kvproxy.telemetry.metrics import Metrics
from kvproxy.upstream.replicas import ReplicaPool, ResponseLimits, Timeouts

log = logging.getLogger(__name__)

Deployment = EmbeddedDeployment | HttpDeployment


def drift_detector(
    spec: DriftSpec, primary_kv: KVConfig | None, score_path: str | None = None
) -> DriftDetector:
    """The detector a file entry asks for: armed from a calibration baseline, or warming up.
    ``score_path``: the deployment's, where known at start-up (an HTTP reference says its own later)."""
    drift = DriftDetector(warmup=spec.warmup, h=spec.threshold, k=spec.allowance)
    if spec.baseline is not None:
        b = read_baseline(spec.baseline, primary_kv, default_log_sigma=spec.log_sigma)
        if score_path is not None and b.score_path != score_path:
            log.warning(
                "drift baseline %s was calibrated on the %s path, the deployment scores on the %s path: "
                "on CUDA the two differ by more than q8_0 costs (docs/kld.md); recalibrate with "
                "`kvproxy calibrate --score-path %s`",
                spec.baseline,
                b.score_path,
                score_path,
                score_path,
            )
        drift.arm(b.mean_kld, b.log_sigma)
    return drift


def guard_for(spec: GuardSpec | None) -> Guard | None:
    if spec is None:
        return None
    return Guard(spec.fallback, spec.min_hold_seconds, probe_concurrency=spec.probe_concurrency)


def embedded_deployment(
    settings: Settings,
    info: ModelInfo,
    backend: EmbeddedBackend | None = None,
    *,
    spec: DeploymentSpec | None = None,
    metrics: Metrics | None = None,
) -> EmbeddedDeployment:
    """The zero-configuration deployment: primary and exact scorer in process on one set of weights."""
    backend = backend or EmbeddedBackend(settings, info)
    reference = KVConfig(settings.reference_cache_type, settings.reference_cache_type)
    scorer = whatif_scorer(settings, backend, reference) or ThreadedScorer(
        lambda: make_scorer(backend, reference)
    )
    deployment = EmbeddedDeployment(
        backend,
        scorer,
        reference_kv=reference,
        shadow=ShadowOptions(
            ShadowSampler(settings.shadow_rate),
            tracker=QualityTracker(window=settings.status_window),
            drift=drift_detector(spec.drift, backend.kv, settings.score_path.value) if spec else None,
            queue_size=settings.shadow_queue_size,
        ),
        guard=guard_for(spec.guard) if spec else None,
        score_path=settings.score_path.value,
        metrics=metrics,
    )
    attach_whatif(deployment, metrics)
    return deployment


def _servers(spec: DeploymentSpec) -> dict[str, tuple[AttentionShape, ServerSpec]]:
    """Per role, the shape of the GGUF its llama-servers load and how they were started; the
    context defaults to the GGUF's training context, as llama-server's ``-c 0`` does."""
    out: dict[str, tuple[AttentionShape, ServerSpec]] = {}
    backends: list[tuple[str, BackendSpec | None]] = [
        ("primary", spec.primary),
        ("reference", spec.reference),
    ]
    for role, backend in backends:
        if backend is None or backend.server is None:
            continue
        srv = backend.server
        info = read_model_info(srv.model)  # a ValueError names the file
        if not srv.ctx_size:
            if info.context_length is None:
                raise ValueError(f"{srv.model} gives no context length: set ctx_size in its `server` table")
            srv = srv.model_copy(update={"ctx_size": info.context_length})
        out[role] = (info.attention, srv)
    return out


def http_deployment(
    spec: DeploymentSpec,
    *,
    window: int = 4096,
    metrics: Metrics | None = None,
    limits: ResponseLimits = ResponseLimits(),
) -> HttpDeployment:
    """A deployment served by llama-server replicas (and scored on its reference, if any)."""
    timeouts = Timeouts(spec.timeouts.connect, spec.timeouts.read, spec.timeouts.total)
    ref = spec.reference
    primary_kv = spec.primary.kv()

    def pool(urls: list[str], api_key: str | None) -> ReplicaPool:
        return ReplicaPool(
            urls, timeouts, health_interval=spec.health_interval, api_key=api_key, limits=limits
        )

    return HttpDeployment(
        spec.model,
        primary_pool=pool(spec.primary.urls, spec.primary.api_key()),
        reference_pool=pool(ref.urls, ref.api_key()) if ref else None,
        primary_kv=primary_kv,
        reference_kv=ref.kv(KVCacheType.F16) if ref else None,
        shadow=ShadowOptions(
            ShadowSampler(spec.shadow_rate),
            tracker=QualityTracker(window=window),
            drift=drift_detector(spec.drift, primary_kv),
            queue_size=spec.queue_size,
            concurrency=spec.concurrency,
        ),
        guard=guard_for(spec.guard),
        top_k=spec.top_k,
        primary_logprobs=spec.primary_logprobs,
        prompt_fill=spec.primary.prompt_fill(),
        metrics=metrics,
        servers=_servers(spec),
    )


def build_deployments(
    config: ProxyConfig, settings: Settings, *, metrics: Metrics | None = None
) -> list[Deployment]:
    """Every deployment of a deployments file; an embedded one takes its model from ``settings``."""
    out: list[Deployment] = []
    for spec in config.deployments:
        if not spec.primary.embedded:
            limits = ResponseLimits(settings.upstream_max_body_bytes, settings.upstream_max_event_bytes)
            out.append(http_deployment(spec, window=settings.status_window, metrics=metrics, limits=limits))
            continue
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
        info = read_model_info(resolve_model_path(s.model))
        out.append(embedded_deployment(s, info, spec=spec, metrics=metrics))
    return out
