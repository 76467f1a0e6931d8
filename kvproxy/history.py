"""A bounded KLD-over-time series per deployment, so the live quality page has history on load.

One point per scored job, ``(unix time, recent-window mean KLD, recent-window p99, tokens since
start)``; a job scored within ``min_interval`` seconds of the last point replaces that point instead
of adding one, so a busy deployment adds at most one point per interval (the page polls every 2 s)
and ``capacity`` points cover at least ``capacity * min_interval`` seconds.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvproxy.quality import QualityTracker


@dataclass(frozen=True)
class HistoryPoint:
    time: float  # unix seconds
    mean: float | None  # mean KLD over the recent window (nats)
    p99: float | None  # 99th percentile of KLD over the recent window (nats)
    tokens: int  # scored tokens since start

    def as_dict(self) -> dict[str, float | int | None]:
        return {"time": round(self.time, 3), "mean": self.mean, "p99": self.p99, "tokens": self.tokens}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


class KLDHistory:
    def __init__(
        self, capacity: int = 360, min_interval: float = 2.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.capacity = capacity
        self.min_interval = min_interval
        self._clock = clock
        self._points: deque[HistoryPoint] = deque(maxlen=capacity)

    def record(self, tracker: QualityTracker) -> None:
        """After a scored job: the tracker's recent window as it is now."""
        recent = tracker.recent()
        point = HistoryPoint(self._clock(), _finite(recent.mean), _finite(recent.p99), tracker.tokens)
        if self._points and point.time - self._points[-1].time < self.min_interval:
            self._points[-1] = HistoryPoint(self._points[-1].time, point.mean, point.p99, point.tokens)
        else:
            self._points.append(point)

    def __len__(self) -> int:
        return len(self._points)

    def as_list(self) -> list[dict[str, float | int | None]]:
        return [p.as_dict() for p in self._points]
