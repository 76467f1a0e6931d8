"""What serving and shadow code tells whoever watches it, as small protocols with do-nothing defaults.

Backends, upstream clients and the shadow pool take an observer at construction and call it
unconditionally; :mod:`kvproxy.telemetry.metrics` implements these protocols with Prometheus, tests may pass
their own, and code built without metrics gets the null observers below. Nothing here imports the
metrics library, so the layers below serving never depend on it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvproxy.kld import PositionScores


class ServingEvents(Protocol):
    """One deployment's serving signals."""

    @property
    def active(self) -> bool:
        """Whether anyone listens: a null observer lets callers skip measuring (clock reads, parsing)."""
        ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def tokens(self, prompt: int, completion: int) -> None: ...

    def upstream_error(self, kind: str) -> None: ...

    def drift_transition(self, state: str) -> None: ...

    def guard_switch(self, to: str) -> None: ...

    def guard_probe(self, outcome: str) -> None: ...


class ShadowEvents(Protocol):
    """Told of every shadow outcome and every scored job."""

    def outcome(self, name: str) -> None: ...

    def skipped(self, reason: str) -> None: ...

    def scored(self, scores: PositionScores, lag_seconds: float, turn: str = "text") -> None: ...


class NullServingEvents:
    active = False

    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass

    def tokens(self, prompt: int, completion: int) -> None:
        pass

    def upstream_error(self, kind: str) -> None:
        pass

    def drift_transition(self, state: str) -> None:
        pass

    def guard_switch(self, to: str) -> None:
        pass

    def guard_probe(self, outcome: str) -> None:
        pass


class NullShadowEvents:
    def outcome(self, name: str) -> None:
        pass

    def skipped(self, reason: str) -> None:
        pass

    def scored(self, scores: PositionScores, lag_seconds: float, turn: str = "text") -> None:
        pass


NULL_SERVING = NullServingEvents()
NULL_SHADOW = NullShadowEvents()


class TokenClock:
    """Times one response: the first piece of text, then the gaps between pieces."""

    def __init__(self, events: ServingEvents) -> None:
        self.events = events
        self.active = events.active
        self.start = time.perf_counter() if self.active else 0.0
        self.last: float | None = None

    def tick(self) -> None:
        if not self.active:
            return
        now = time.perf_counter()
        if self.last is None:
            self.events.first_token(now - self.start)
        else:
            self.events.inter_token(now - self.last)
        self.last = now
