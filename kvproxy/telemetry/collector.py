"""The deployments' state as Prometheus samples, read at scrape time by one custom collector.

A deployment registers nothing with Prometheus for what it *is* (its queue depth, drift state,
guard, replica health, slots): it offers a :class:`DeploymentState` of plain values, and
:class:`DeploymentCollector` (client_python's custom-collector pattern: ``registry.register`` of an
object whose ``collect()`` yields metric families) turns every watched deployment's state into
samples when ``/metrics`` is read. Events (scores, outcomes, latencies) still count into counters
and histograms through kvproxy.observers' protocols (kvproxy.telemetry.export).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvproxy.shadow.drift import STATE_CODES


@dataclass(frozen=True)
class DeploymentState:
    """What one deployment is at this moment, as plain values."""

    shadow_queued: int
    drift_state: str  # a key of kvproxy.shadow.drift.STATE_CODES
    drift_statistic: float
    guard: tuple[str, bool] | None = None  # (its fallback, whether traffic goes there now)
    backends: tuple[tuple[str, str, bool], ...] = ()  # (role, replica, up)
    slots: dict[str, int] = field(default_factory=dict)  # an embedded server's: total, busy, waiting


class StateSource(Protocol):
    name: str

    def state(self) -> DeploymentState: ...


# name -> (help, label names): the families this collector owns (no prometheus_client object has them)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "kvproxy_shadow_queue_depth": ("Shadow jobs waiting to be scored.", ("deployment",)),
    "kvproxy_backend_up": (
        "1 when a backend replica is healthy (or an embedded model loaded), else 0.",
        ("deployment", "role", "replica"),
    ),
    "kvproxy_embedded_slots": (
        "Embedded server slots (--parallel) and requests: total slots, busy slots, requests waiting.",
        ("deployment", "state"),
    ),
    "kvproxy_drift_state": ("Drift detector state: -1 warm-up, 0 ok, 1 warning, 2 drift.", ("deployment",)),
    "kvproxy_drift_statistic": (
        "The detector's CUSUM statistic (drift above its threshold).",
        ("deployment",),
    ),
    "kvproxy_guard_active": (
        "1 while a guarded deployment's traffic goes to its fallback, else 0.",
        ("deployment", "fallback"),
    ),
}


def _families() -> dict[str, GaugeMetricFamily]:
    return {name: GaugeMetricFamily(name, doc, labels=labels) for name, (doc, labels) in FAMILIES.items()}


class DeploymentCollector(Collector):
    def __init__(self) -> None:
        self._sources: list[StateSource] = []
        self._lock = threading.Lock()  # the --metrics-port server scrapes from its own threads

    def watch(self, source: StateSource) -> None:
        """Read ``source`` at every scrape; it replaces a source of the same name (as a labelled
        child's ``set_function`` did)."""
        with self._lock:
            self._sources = [s for s in self._sources if s.name != source.name] + [source]

    def describe(self) -> Iterator[Metric]:
        """The families' names, for the registry's duplicate check (no deployment is read)."""
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        families = _families()
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            name, st = source.name, source.state()
            families["kvproxy_shadow_queue_depth"].add_metric([name], st.shadow_queued)
            families["kvproxy_drift_state"].add_metric([name], STATE_CODES[st.drift_state])
            families["kvproxy_drift_statistic"].add_metric([name], st.drift_statistic)
            if st.guard is not None:
                families["kvproxy_guard_active"].add_metric([name, st.guard[0]], float(st.guard[1]))
            for role, replica, up in st.backends:
                families["kvproxy_backend_up"].add_metric([name, role, replica], float(up))
            for slot_state, n in st.slots.items():
                families["kvproxy_embedded_slots"].add_metric([name, slot_state], float(n))
        yield from families.values()
