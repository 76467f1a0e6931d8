"""The sustainable shadow rate: scoring capacity over generation load, shown before shedding starts.

Why: at a shadow rate above what the scorer can keep up with, the queue fills and jobs are dropped
or shed; a user should see the headroom first. Two measurements:

* scoring cost: seconds the scorer spent per scored token, over its last :data:`COST_JOBS` jobs
  (a property of the scorer and the model, so not tied to a time window);
* generation load: tokens generated per second over the ``window`` seconds up to the latest request
  (anchored there, not at the time of reading, so that an idle server shows the load it last saw
  and two reads without traffic between them agree). Embedded serving
  reports every finished generation (exact); proxy mode does not see unsampled answers' lengths,
  so there it is requests per second times the mean length of the scored jobs (sampling is random,
  so that mean estimates every request's).

``sustainable_rate = 1 / (seconds per scored token x generated tokens per second)``: the fraction
of requests that could be scored as fast as they come (above 1: headroom to spare). None until
both are known.
"""

from __future__ import annotations

import time
from collections import deque

COST_JOBS = 64  # scored jobs the cost is averaged over
WINDOW_SECONDS = 60.0


def sustainable_rate(seconds_per_token: float | None, generated_per_second: float | None) -> float | None:
    """Scoring capacity (tokens/s) over generation load (tokens/s); None when either is unknown."""
    if not seconds_per_token or not generated_per_second:
        return None
    return 1.0 / (seconds_per_token * generated_per_second)


class ScoringCapacity:
    """Not thread-safe: fed and read on the event loop."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        # (tokens, seconds, jobs) per scoring call
        self._cost: deque[tuple[int, float, int]] = deque(maxlen=COST_JOBS)
        self._generated: deque[tuple[float, int]] = deque()  # (when, tokens): embedded, exact
        self._requests: deque[float] = deque()  # when each request reached generation

    def _trim(self, now: float) -> None:
        start = now - self.window
        while self._generated and self._generated[0][0] < start:
            self._generated.popleft()
        while self._requests and self._requests[0] < start:
            self._requests.popleft()

    def request(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._requests.append(now)
        self._trim(now)

    def generated(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._generated.append((now, tokens))
        self._trim(now)

    def scored(self, tokens: int, seconds: float, jobs: int = 1) -> None:
        if tokens > 0:
            self._cost.append((tokens, seconds, jobs))

    @property
    def seconds_per_token(self) -> float | None:
        tokens = sum(c[0] for c in self._cost)
        return sum(c[1] for c in self._cost) / tokens if tokens else None

    def status(self) -> dict[str, float | str | None]:
        cost = self.seconds_per_token
        if self._generated:
            load: float | None = sum(n for _, n in self._generated) / self.window
            source = "generated"
        elif self._cost and self._requests:
            mean_tokens = sum(c[0] for c in self._cost) / sum(c[2] for c in self._cost)
            load, source = len(self._requests) * mean_tokens / self.window, "estimated"
        else:
            load, source = None, "none"
        return {
            "scoring_seconds_per_token": cost,
            "generated_tokens_per_second": load,
            "load_source": source,
            "window_seconds": self.window,
            "sustainable_rate": sustainable_rate(cost, load),
        }
