"""One deployment's shadow path: who is sampled, the queue and its workers, and what scores feed.

A scored job updates the quality statistics (in the pool), then the KLD-over-time series and the
drift detector here; then ``after_scored`` is told the change of drift state, if any (the deployment
logs and counts it and steps its guard).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kvproxy.kld import PositionScores
from kvproxy.observers import NULL_SHADOW, ShadowEvents
from kvproxy.scoring.job import Scorer
from kvproxy.shadow.ask import ShadowAsk
from kvproxy.shadow.drift import DriftDetector
from kvproxy.shadow.history import KLDHistory
from kvproxy.shadow.pool import ShadowPool, ShadowSampler, ShadowTicket
from kvproxy.shadow.quality import QualityTracker


class ShadowPath:
    def __init__(
        self,
        sampler: ShadowSampler,
        scorer: Scorer,
        *,
        tracker: QualityTracker | None = None,
        drift: DriftDetector | None = None,
        queue_size: int = 64,
        concurrency: int = 1,
        events: ShadowEvents = NULL_SHADOW,
        after_scored: Callable[[str | None], None] = lambda changed: None,
    ) -> None:
        self.sampler = sampler
        self.tracker = tracker or QualityTracker()
        self.drift = drift or DriftDetector()
        self.history = KLDHistory()
        self.after_scored = after_scored
        self.requests = 0  # requests that reached generation: the denominator of coverage
        self.pool = ShadowPool(
            scorer,
            self.tracker,
            queue_size=queue_size,
            concurrency=concurrency,
            events=events,
            on_scored=self._scored,
        )

    def ticket(self, ask: ShadowAsk) -> ShadowTicket | None:
        """Called once per request that reaches generation (each kind's serving code does)."""
        self.requests += 1
        self.pool.capacity.request()
        return self.pool.ticket(ask) if self.sampler.decide(ask.directive) else None

    def generated(self, tokens: int) -> None:
        """A finished generation's token count (embedded serving: the exact generation load)."""
        self.pool.capacity.generated(tokens)

    def _scored(self, scores: PositionScores) -> None:
        self.history.record(self.tracker)
        self.after_scored(self.drift.update(float(np.mean(scores.kld))))

    def coverage(self) -> dict[str, Any]:
        c, n = self.pool.counters, self.requests
        return {
            "requests": n,
            "sampled_fraction": c.sampled / n if n else None,
            "scored_fraction": c.scored / n if n else None,
        }
