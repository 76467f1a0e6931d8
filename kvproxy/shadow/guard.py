"""The guard: while a deployment's drift detector says ``drift``, its traffic goes to a fallback.

Hysteresis comes from two places: the detector itself only returns to ``ok`` once its statistic has
fallen to a quarter of the threshold (kvproxy.shadow.drift), and the guard stays on the fallback for at
least ``min_hold_seconds`` after it switched, so a deployment cannot flap between the two. A
``warning`` changes nothing in either direction. Pure: the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvproxy.shadow.drift import DRIFT, OK

PRIMARY, FALLBACK = "primary", "fallback"
# a probe replays a sampled request on the drifting primary so shadow scoring (and recovery) goes on
PROBE_OUTCOMES = ("started", "skipped", "failed")


@dataclass
class Guard:
    fallback: str  # the model name of the deployment that serves while this one drifts
    min_hold_seconds: float = 30.0
    probe_concurrency: int = 1  # sampled requests replayed on the drifting primary at once, at most
    active: bool = False
    since: float | None = None  # time of the last switch
    to_fallback: int = 0
    to_primary: int = 0
    probes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBE_OUTCOMES, 0))

    def evaluate(self, drift_state: str, now: float) -> str | None:
        """Returns ``fallback`` or ``primary`` when the route changes, else None."""
        if not self.active and drift_state == DRIFT:
            self.active, self.since = True, now
            self.to_fallback += 1
            return FALLBACK
        if (
            self.active
            and drift_state == OK
            and self.since is not None
            and now - self.since >= self.min_hold_seconds
        ):
            self.active, self.since = False, now
            self.to_primary += 1
            return PRIMARY
        return None

    def status(self, now: float) -> dict[str, object]:
        return {
            "fallback": self.fallback,
            "active": self.active,
            "serving": FALLBACK if self.active else PRIMARY,
            "min_hold_seconds": self.min_hold_seconds,
            "seconds_since_switch": None if self.since is None else round(now - self.since, 3),
            "switches": {"to_fallback": self.to_fallback, "to_primary": self.to_primary},
            "probes": dict(self.probes),
        }
