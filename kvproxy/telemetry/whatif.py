"""The what-if's Prometheus metrics: read from the tracker at scrape time, one series per config.

Labels: ``deployment`` and ``candidate`` (the KV config as the operator spelt it in ``--what-if``,
or the served / reference config: never client text), ``role`` (served, candidate, reference),
``reference_type`` and ``score_path`` (compare series of one path only, as for the shadow metrics).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from kvproxy.shadow.whatif import OUTCOMES, ConfigCost, WhatIfTracker

LABELS = ("deployment", "candidate", "role", "reference_type", "score_path")


@dataclass(frozen=True)
class WhatIfMetrics:
    mean_kld: Gauge
    mean_kld_error: Gauge
    same_top: Gauge
    tokens: Gauge
    bytes_per_token: Gauge
    kv_bytes: Gauge
    on_frontier: Gauge
    within_budget: Gauge
    budget: Gauge
    jobs: Gauge


_families: weakref.WeakKeyDictionary[CollectorRegistry, WhatIfMetrics] = weakref.WeakKeyDictionary()


def whatif_metrics(registry: CollectorRegistry) -> WhatIfMetrics:
    """The families on ``registry``, created once (several deployments share them)."""
    if registry not in _families:

        def gauge(name: str, doc: str, labels: tuple[str, ...] = LABELS) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        _families[registry] = WhatIfMetrics(
            mean_kld=gauge(
                "kvproxy_whatif_mean_kld", "Mean per-token KLD vs the reference since start, nats."
            ),
            mean_kld_error=gauge(
                "kvproxy_whatif_mean_kld_error", "Standard error of kvproxy_whatif_mean_kld."
            ),
            same_top=gauge(
                "kvproxy_whatif_same_top_ratio", "Share of positions whose top token is the reference's."
            ),
            tokens=gauge("kvproxy_whatif_scored_tokens", "Positions scored for this config since start."),
            bytes_per_token=gauge("kvproxy_whatif_kv_bytes_per_token", "KV-cache bytes one token costs."),
            kv_bytes=gauge("kvproxy_whatif_kv_bytes", "KV-cache bytes at the deployment's context."),
            on_frontier=gauge("kvproxy_whatif_pareto", "1 if no other config is both smaller and better."),
            within_budget=gauge(
                "kvproxy_whatif_within_budget", "1 for the cheapest config within --what-if-kld-budget."
            ),
            budget=gauge("kvproxy_whatif_kld_budget", "The --what-if-kld-budget, nats.", ("deployment",)),
            jobs=gauge(
                "kvproxy_whatif_jobs", "Jobs offered to the what-if, by outcome.", ("deployment", "outcome")
            ),
        )
    return _families[registry]


def _nan_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


def export_whatif(registry: CollectorRegistry, deployment: str, tracker: WhatIfTracker) -> None:
    """Every what-if series of one deployment, computed when scraped."""
    m = whatif_metrics(registry)
    ref_type = str(tracker.reference.kv.cache_type_k)
    m.budget.labels(deployment).set(tracker.budget)
    for outcome in OUTCOMES:
        m.jobs.labels(deployment, outcome).set_function(lambda o=outcome: float(tracker.counts.by_outcome[o]))  # type: ignore[misc]
    for c in tracker.configs:
        labels = (deployment, c.label, c.role, ref_type, tracker.score_path)
        m.bytes_per_token.labels(*labels).set(c.bytes_per_token)
        m.kv_bytes.labels(*labels).set(c.allocated_bytes)

        def figure(key: str, c: ConfigCost = c) -> Callable[[], float]:
            return lambda: _nan_none(_row(tracker, c)["kld"].get(key))

        m.mean_kld.labels(*labels).set_function(figure("mean"))
        m.mean_kld_error.labels(*labels).set_function(figure("mean_error"))
        m.same_top.labels(*labels).set_function(figure("same_top"))
        m.tokens.labels(*labels).set_function(figure("tokens"))
        m.on_frontier.labels(*labels).set_function(lambda c=c: float(_row(tracker, c)["pareto"]))  # type: ignore[misc]
        m.within_budget.labels(*labels).set_function(
            lambda c=c: float(tracker.status()["within_budget"] == c.label)  # type: ignore[misc]
        )


def _row(tracker: WhatIfTracker, c: ConfigCost) -> dict[str, Any]:
    return next(r for r in tracker.status()["configs"] if r["config"] == c.label)
