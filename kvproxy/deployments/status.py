"""One deployment as the status route (and the live quality page) shows it."""

from __future__ import annotations

import time
from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.deployments.base import DeploymentBase
from kvproxy.model.memory import KV_MEMORY_FIELDS


def kv_dict(kv: KVConfig | None) -> dict[str, str] | None:
    return None if kv is None else kv.as_dict()


def memory_status(d: DeploymentBase) -> dict[str, Any] | None:
    """KV bytes of the primary config against f16 (kvproxy.model.memory). Without the model's attention
    shape (a llama-server primary) only the config is known: the figures are null."""
    kv = kv_dict(d.primary_kv)
    if kv is None:
        return None
    return {**kv, **(d.kv_figures() or dict.fromkeys(KV_MEMORY_FIELDS))}


def deployment_status(d: DeploymentBase) -> dict[str, Any]:
    shadow = d.shadow
    c, pool, tracker = shadow.pool.counters, shadow.pool, shadow.tracker
    return {
        "name": d.name,
        "ready": d.ready,
        "primary": kv_dict(d.primary_kv),
        "reference": kv_dict(d.reference_kv),
        "estimator": d.estimator,
        "score_path": d.score_path,
        **d.backend_status(),
        "drift": shadow.drift.status(),
        "guard": None
        if d.guard is None
        else {**d.guard.status(time.monotonic()), "probes_in_flight": len(d.probes)},
        "shadow": {
            "rate": shadow.sampler.rate,
            "sampled": c.sampled,
            "scored": c.scored,
            "dropped": c.dropped,
            "failed": c.failed,
            "shed": c.shed,
            "skipped": dict(c.skipped),  # part of dropped, by reason
            "token_ids": dict(c.token_ids),  # scored jobs by where their token ids came from
            "queued": pool.queued,
            "in_flight": pool.in_flight,
            "scored_tokens": c.scored_tokens,
            "last_lag_seconds": c.last_lag_seconds,
            "coverage": shadow.coverage(),
            "capacity": pool.capacity.status(),  # the sustainable shadow rate (kvproxy.shadow.capacity)
            "capture": d.capture_status(),
        },
        "kld": {
            "since_start": tracker.since_start().as_dict(),
            "recent": {"window_tokens": tracker.window, **tracker.recent().as_dict()},
        },
        "memory": memory_status(d),
        "history": shadow.history.as_list(),
        "histogram": tracker.histogram(),
        # null unless --what-if names candidates, or a scoring server's (docs/what-if.md), with why
        **what_if_keys(d),
    }


def what_if_keys(d: DeploymentBase) -> dict[str, Any]:
    """``what_if`` and ``what_if_reason`` (null when there is a what-if): the status route's keys and
    the what-if route's."""
    what_if, reason = d.what_if_status()
    return {"what_if": what_if, "what_if_reason": reason}
