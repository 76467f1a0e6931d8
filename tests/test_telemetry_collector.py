"""One collector turns the deployments' plain state into samples when /metrics is read
(kvproxy.telemetry.collector): the names, labels and values the dashboards and alerts read."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

from kvproxy.telemetry.collector import DeploymentState
from kvproxy.telemetry.metrics import Metrics


@dataclass
class Source:
    name: str
    now: DeploymentState

    def state(self) -> DeploymentState:
        return self.now


def samples(registry: CollectorRegistry) -> set[str]:
    return {line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")}


def test_state_is_read_at_scrape_time_under_the_metric_names() -> None:
    metrics = Metrics(CollectorRegistry())
    relay = Source(
        "q4",
        DeploymentState(
            shadow_queued=3,
            drift_state="warning",
            drift_statistic=1.5,
            guard=("f16", False),
            backends=(("primary", "http://a:8080", True), ("reference", "http://b:8080", False)),
        ),
    )
    metrics.deployments.watch(relay)
    got = samples(metrics.registry)
    assert {
        'kvproxy_shadow_queue_depth{deployment="q4"} 3.0',
        'kvproxy_drift_state{deployment="q4"} 1.0',
        'kvproxy_drift_statistic{deployment="q4"} 1.5',
        'kvproxy_guard_active{deployment="q4",fallback="f16"} 0.0',
        'kvproxy_backend_up{deployment="q4",replica="http://a:8080",role="primary"} 1.0',
        'kvproxy_backend_up{deployment="q4",replica="http://b:8080",role="reference"} 0.0',
    } <= got
    assert not any(line.startswith("kvproxy_embedded_slots{") for line in got)  # not an embedded one
    relay.now = DeploymentState(0, "drift", 9.0, guard=("f16", True))  # read again at the next scrape
    got = samples(metrics.registry)
    assert 'kvproxy_drift_state{deployment="q4"} 2.0' in got
    assert 'kvproxy_guard_active{deployment="q4",fallback="f16"} 1.0' in got
    metrics.deployments.watch(Source("q4", DeploymentState(7, "ok", 0.0, slots={"total": 2, "busy": 1})))
    got = samples(metrics.registry)  # a deployment of the same name replaces the first
    assert 'kvproxy_shadow_queue_depth{deployment="q4"} 7.0' in got
    assert 'kvproxy_embedded_slots{deployment="q4",state="busy"} 1.0' in got
    assert not any("guard_active{" in line for line in got)
