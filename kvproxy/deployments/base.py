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
from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.observers import NULL_SERVING, ServingEvents
from kvproxy.shadow.guard import Guard
from kvproxy.shadow.path import ShadowPath
from kvproxy.shadow.pool import ShadowDirective, ShadowTicket
from kvproxy.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class DeploymentBase:
    """Subclasses build ``self.shadow`` (it needs their scorer) and say whether they are ready."""

    shadow: ShadowPath
    estimator: str = "exact"
    score_path: str = "decode"  # which numerics score both sides (kvproxy.config.ScorePath)

    def __init__(
        self,
        name: str,
        *,
        primary_kv: KVConfig | None,
        reference_kv: KVConfig | None,
        guard: Guard | None = None,
        events: ServingEvents = NULL_SERVING,
    ) -> None:
        self.name = name
        self.primary_kv = primary_kv
        self.reference_kv = reference_kv
        self.guard = guard
        self.events = events
        self.probes: set[asyncio.Task[None]] = set()  # the guard's replays on a drifting primary

    @property
    def model_label(self) -> str:
        """The model behind the deployment, for metrics: the GGUF's name in process, else the
        deployment's own name (a llama-server's model is whatever it was started with)."""
        return self.name

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    def ticket(self, directive: ShadowDirective | None) -> ShadowTicket | None:
        return self.shadow.ticket(directive)

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

    def kv_figures(self) -> dict[str, Any] | None:
        """KV memory figures (kvproxy.memory.KV_MEMORY_FIELDS) when the model's shape is known."""
        return None

    async def cancel_probes(self) -> None:
        await cancel_and_wait(list(self.probes))
