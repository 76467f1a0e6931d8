"""What deployments and the serving path report into the metrics: kvproxy.observers' protocols
implemented with Prometheus (one object per deployment, label children bound once), and the gauges a
deployment exports at construction (KV memory, backend up, the guard)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, Unpack

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.kld import PositionScores
from kvproxy.model.memory import AttentionShape, KVLayout, kv_memory_summary
from kvproxy.scoring.job import ID_SOURCES, SKIP_REASONS, TURNS
from kvproxy.shadow.guard import FALLBACK, PRIMARY, PROBE_OUTCOMES, Guard
from kvproxy.telemetry.metrics import POSITION_BUCKETS, POSITION_OVER, QUALITY_LABELS, Metrics

if TYPE_CHECKING:
    from kvproxy.shadow.path import ShadowPath


class ObservedDeployment(Protocol):
    """What the metrics read of a deployment (kvproxy.deployments.base.DeploymentBase)."""

    name: str
    primary_kv: KVConfig | None
    reference_kv: KVConfig | None
    shadow: ShadowPath

    @property
    def model_label(self) -> str: ...

    @property
    def estimator(self) -> str: ...

    @property
    def score_path(self) -> str: ...


def _or_nan(x: object) -> float:
    return float(x) if isinstance(x, int | float) else math.nan


class DeploymentObserver:
    """Feeds one deployment's shadow outcomes and scores into the metrics (kvproxy.observers)."""

    def __init__(self, metrics: Metrics, deployment: ObservedDeployment) -> None:
        self.metrics = metrics
        self.deployment = deployment
        self._series = (deployment.estimator, deployment.score_path)
        name = deployment.name
        # Every series exists from the start, at 0: a rate over a counter that first appears at its
        # final value would read 0 (Prometheus's advice on missing series).
        for outcome in ("sampled", "scored", "dropped", "failed", "shed"):
            metrics.shadow_requests.labels(name, outcome)
        for reason in SKIP_REASONS:
            metrics.shadow_skipped.labels(name, reason)
        for source in ID_SOURCES:
            metrics.shadow_token_ids.labels(name, source)
        metrics.shadow_lag.labels(name)
        for turn in TURNS:
            metrics.turn_token_kld.labels(name, deployment.model_label, turn)
        metrics.shadow_sustainable_rate.labels(name).set_function(
            lambda: _or_nan(deployment.shadow.pool.capacity.status()["sustainable_rate"])
        )
        self._touch_quality_series()

    def _touch_quality_series(self) -> None:
        m, lv = self.metrics, [self.labels()[k] for k in QUALITY_LABELS]
        for _, bucket in (*POSITION_BUCKETS, (None, POSITION_OVER)):
            m.token_kld.labels(*lv, bucket)
        for family in (m.request_mean_kld, m.delta_p, m.delta_p_squared, m.scored_tokens, m.same_top_tokens):
            family.labels(*lv)

    def labels(self) -> dict[str, str]:
        d = self.deployment
        undeclared = "undeclared"
        return {
            "deployment": d.name,
            "model": d.model_label,
            "cache_type_k": d.primary_kv.cache_type_k.value if d.primary_kv else undeclared,
            "cache_type_v": d.primary_kv.cache_type_v.value if d.primary_kv else undeclared,
            "reference_type": str(d.reference_kv) if d.reference_kv else undeclared,
            "estimator": d.estimator,
            "score_path": d.score_path,
        }

    def outcome(self, name: str) -> None:
        self.metrics.shadow_requests.labels(self.deployment.name, name).inc()

    def skipped(self, reason: str) -> None:
        self.metrics.shadow_skipped.labels(self.deployment.name, reason).inc()

    def scored(self, scores: PositionScores, lag_seconds: float, turn: str = "text") -> None:
        labels = self.labels()
        series = (labels["estimator"], labels["score_path"])
        if series != self._series:  # an HTTP reference was identified: new series
            self._series = series
            self._touch_quality_series()
        self.metrics.observe_scores(labels, scores, scores.positions.tolist())
        by_turn = self.metrics.turn_token_kld.labels(labels["deployment"], labels["model"], turn)
        for v in scores.kld.tolist():
            by_turn.observe(v)
        self.metrics.shadow_lag.labels(self.deployment.name).observe(lag_seconds)
        if scores.ids_source is not None:
            self.metrics.shadow_token_ids.labels(self.deployment.name, scores.ids_source).inc()
        if scores.served_divergence is not None:
            h = self.metrics.served_divergence.labels(
                *(labels[k] for k in ("deployment", "model", "cache_type_k", "cache_type_v", "score_path"))
            )
            for v in scores.served_divergence[~np.isnan(scores.served_divergence)].tolist():
                h.observe(v)


def export_guard(metrics: Metrics, deployment: str, guard: Guard) -> None:
    """The guard's switch and probe counters at 0 from the start (its state: kvproxy.telemetry.collector)."""
    for to in (PRIMARY, FALLBACK):
        metrics.guard_switches.labels(deployment, to)
    for outcome in PROBE_OUTCOMES:
        metrics.guard_probes.labels(deployment, outcome)


def export_kv_memory(
    metrics: Metrics,
    deployment: str,
    role: str,
    shape: AttentionShape,
    kv: KVConfig,
    n_ctx: int,
    **layout: Unpack[KVLayout],
) -> None:
    """KV-cache bytes of one config, from the GGUF's attention shape (kvproxy.model.memory: the same
    figures as the start-up banner and the status endpoint), and a hybrid model's recurrent state."""
    labels = (deployment, role, kv.cache_type_k.value, kv.cache_type_v.value)
    m = kv_memory_summary(shape, kv.cache_type_k, kv.cache_type_v, n_ctx, **layout)
    metrics.kv_bytes_per_token.labels(*labels).set(m["bytes_per_token"])
    metrics.kv_bytes.labels(*labels).set(m["allocated_bytes"])
    metrics.kv_f16_bytes.labels(*labels).set(m["f16_allocated_bytes"])
    if m["allocated_bytes"]:
        metrics.kv_saving_ratio.labels(*labels).set(m["f16_allocated_bytes"] / m["allocated_bytes"])
    if shape.recurrent_layers:
        metrics.recurrent_bytes.labels(deployment, role).set(m["recurrent_bytes"])


UPSTREAM_ERROR_KINDS = ("unavailable", "timeout", "status", "stream_ended", "invalid_response", "too_large")


class ServingObserver:
    """The serving signals of one deployment, label children bound once (cheap on the hot path)."""

    active = True

    def __init__(self, metrics: Metrics, deployment: str) -> None:
        self._transitions = {
            s: metrics.drift_transitions.labels(deployment, s) for s in ("ok", "warning", "drift")
        }
        self.ttft = metrics.time_to_first_token.labels(deployment)
        self.itl = metrics.inter_token_latency.labels(deployment)
        self.prompt = metrics.prompt_tokens.labels(deployment)
        self.completion = metrics.completion_tokens.labels(deployment)
        self._errors = {k: metrics.upstream_errors.labels(deployment, k) for k in UPSTREAM_ERROR_KINDS}
        self._metrics, self._deployment = metrics, deployment

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt.inc(prompt)
        self.completion.inc(completion)

    def upstream_error(self, kind: str) -> None:
        self._errors[kind].inc()

    def drift_transition(self, state: str) -> None:
        self._transitions[state].inc()

    def guard_switch(self, to: str) -> None:
        self._metrics.guard_switches.labels(self._deployment, to).inc()

    def guard_probe(self, outcome: str) -> None:
        self._metrics.guard_probes.labels(self._deployment, outcome).inc()
