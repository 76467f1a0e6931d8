"""What every kind of deployment shares: its name, its KV configs, its shadow path and its guard.

Two kinds: :class:`~kvproxy.deployments.embedded.EmbeddedDeployment` (llama.cpp in process, exact
scoring on the same weights) and :class:`~kvproxy.deployments.http.HttpDeployment` (llama-server
replicas, scored on a plain llama-server's top-K or exactly by a kvproxy scoring server). Observers
are given at construction (null ones by default): nothing is attached to a built deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.observers import NULL_SERVING, NULL_SHADOW, ServingEvents
from kvproxy.scoring.job import Scorer
from kvproxy.shadow.ask import ShadowAsk
from kvproxy.shadow.drift import DriftDetector
from kvproxy.shadow.guard import Guard
from kvproxy.shadow.path import ShadowPath
from kvproxy.shadow.pool import ShadowSampler, ShadowTicket
from kvproxy.shadow.quality import QualityTracker
from kvproxy.shadow.whatif import WhatIfTracker
from kvproxy.tasks import cancel_and_wait
from kvproxy.telemetry.collector import DeploymentState
from kvproxy.telemetry.export import DeploymentObserver, ServingObserver, export_guard
from kvproxy.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowOptions:
    """How a deployment's shadow path is set up (kvproxy.shadow.path)."""

    sampler: ShadowSampler
    tracker: QualityTracker | None = None
    drift: DriftDetector | None = None
    queue_size: int = 64
    concurrency: int = 1


class DeploymentBase:
    """Subclasses make their scorer and hand it to :meth:`_start_shadow`, and say whether they are
    ready."""

    shadow: ShadowPath
    estimator: str = "exact"
    score_path: str = "decode"  # which numerics score both sides (kvproxy.config.ScorePath)
    whatif: WhatIfTracker | None = None  # candidate KV configs scored on the same jobs (docs/what-if.md)

    def __init__(
        self,
        name: str,
        *,
        primary_kv: KVConfig | None,
        reference_kv: KVConfig | None,
        guard: Guard | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.primary_kv = primary_kv
        self.reference_kv = reference_kv
        self.guard = guard
        self.metrics = metrics
        self.events: ServingEvents = ServingObserver(metrics, name) if metrics else NULL_SERVING
        self.probes: set[asyncio.Task[None]] = set()  # the guard's replays on a drifting primary
        if metrics is not None and guard is not None:
            export_guard(metrics, name, guard)
        if metrics is not None:  # its state is read when the metrics are (kvproxy.telemetry.collector)
            metrics.deployments.watch(self)

    def state(self) -> DeploymentState:
        """What this deployment is now, as plain values (the metrics read it at scrape time)."""
        guard, drift = self.guard, self.shadow.drift
        return DeploymentState(
            shadow_queued=self.shadow.pool.queued,
            drift_state=drift.state,
            drift_statistic=drift.statistic,
            guard=(guard.fallback, guard.active) if guard is not None else None,
            backends=self.backends_up(),
            slots=self.slots(),
        )

    def backends_up(self) -> tuple[tuple[str, str, bool], ...]:
        """(role, replica, healthy) of every backend this deployment serves or scores with."""
        return ()

    def slots(self) -> dict[str, int]:
        return {}

    def _start_shadow(self, options: ShadowOptions, scorer: Scorer) -> None:
        """The shadow path on this deployment's scorer, its outcomes told to the metrics if any."""
        self.shadow = ShadowPath(
            options.sampler,
            scorer,
            tracker=options.tracker,
            drift=options.drift,
            queue_size=options.queue_size,
            concurrency=options.concurrency,
            events=DeploymentObserver(self.metrics, self) if self.metrics else NULL_SHADOW,
            after_scored=self.after_scored,
        )

    @property
    def model_label(self) -> str:
        """The model behind the deployment, for metrics: the GGUF's name in process, else the
        deployment's own name (a llama-server's model is whatever it was started with)."""
        return self.name

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def ticket(self, ask: ShadowAsk) -> ShadowTicket | None:
        return self.shadow.ticket(ask)

    def after_scored(self, changed: str | None) -> None:
        """After every scored job: log and count a change of drift state, then step the guard."""
        if changed is not None:
            log.warning(
                "deployment %s: drift state %s (statistic %.2f)",
                self.name,
                changed,
                self.shadow.drift.statistic,
            )
            self.events.drift_transition(changed)
        self.step_guard()

    def step_guard(self) -> None:
        """Move the guard by the drift state and the time held (no-op without a guard); a switch
        is logged and counted. Whether traffic goes to the fallback is ``guard.active``."""
        if self.guard is None:
            return
        switched = self.guard.evaluate(self.shadow.drift.state, time.monotonic())
        if switched is not None:
            target = self.guard.fallback if self.guard.active else self.name
            log.warning(
                "deployment %s: guard switched to the %s (%s); drift state %s",
                self.name,
                switched,
                target,
                self.shadow.drift.state,
            )
            self.events.guard_switch(switched)

    def backend_status(self) -> dict[str, Any]:
        """What the status route says of this kind's backends (replicas, scoring server...)."""
        return {}

    def what_if_status(self) -> tuple[dict[str, Any] | None, str | None]:
        """The live what-if (docs/what-if.md) as the status and what-if routes show it, or None and
        why there is none."""
        if self.whatif is not None:
            return self.whatif.status(), None
        return None, "no --what-if candidates: the what-if is off"

    def capture_status(self) -> dict[str, int] | None:
        """The served-row capture's budget and counts (embedded only; kvproxy.backends.row_capture)."""
        return None

    def kv_figures(self) -> dict[str, Any] | None:
        """KV memory figures (kvproxy.model.memory.KV_MEMORY_FIELDS) when the model's shape is known."""
        return None

    async def cancel_probes(self) -> None:
        await cancel_and_wait(list(self.probes))
