"""Online drift detection on per-request mean KLD: a one-sided CUSUM on the log scale.

Per-request mean KLD is skewed (a few hard requests dominate), its logarithm much less so, and a
KV-config change multiplies it (Gemma 3 270M: q8_0 0.0097 -> q4_0 0.121, a factor of 12). So each
request's value becomes ``z = (log(x) - mu) / sigma`` against a baseline (mu, sigma of log values:
from a calibration baseline, or from the first ``warmup`` scored requests), and the statistic
``S = min(2h, max(0, S + z - k))`` accumulates evidence of an increase of about ``2k`` sigma.
State: ``warmup`` until the baseline is known, then ``warning`` above ``h/2``, ``drift`` above
``h``, back to ``ok`` only when S has fallen below ``h/4`` (hysteresis). Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WARMUP, OK, WARNING, DRIFT = "warmup", "ok", "warning", "drift"
STATE_CODES = {WARMUP: -1, OK: 0, WARNING: 1, DRIFT: 2}
_EPS = 1e-6  # keeps log finite for an exactly-zero mean (identical configs)


@dataclass
class DriftDetector:
    warmup: int = 50
    k: float = 1.0  # allowance: half the shift (in sigmas) the detector is tuned for (2 sigma)
    h: float = 10.0  # decision threshold (see docs/drift figures)
    mu: float | None = None
    sigma: float | None = None
    statistic: float = 0.0
    state: str = WARMUP
    requests: int = 0
    _warm: list[float] = field(default_factory=list)

    @classmethod
    def from_baseline(cls, mean_kld: float, log_sigma: float) -> DriftDetector:
        """A detector that starts armed, from a calibration baseline (mean KLD, sigma of log means)."""
        return cls().arm(mean_kld, log_sigma)

    def arm(self, mean_kld: float, log_sigma: float) -> DriftDetector:
        """Take the baseline as given instead of warming up."""
        self.mu, self.sigma, self.state = math.log(mean_kld + _EPS), max(log_sigma, 1e-3), OK
        return self

    def update(self, request_mean_kld: float) -> str | None:
        """Feed one scored request; returns the new state when it changed, else None."""
        self.requests += 1
        x = math.log(max(request_mean_kld, 0.0) + _EPS)
        if self.mu is None or self.sigma is None:
            self._warm.append(x)
            if len(self._warm) < self.warmup:
                return None
            n = len(self._warm)
            self.mu = sum(self._warm) / n
            self.sigma = max(math.sqrt(sum((v - self.mu) ** 2 for v in self._warm) / (n - 1)), 1e-3)
            self._warm.clear()
            return self._move(OK)
        # capped at 2h so that recovery after a long drift takes tens of requests, not hundreds
        self.statistic = min(2 * self.h, max(0.0, self.statistic + (x - self.mu) / self.sigma - self.k))
        if self.statistic > self.h:
            return self._move(DRIFT)
        if self.statistic > self.h / 2 and self.state == OK:
            return self._move(WARNING)
        if self.statistic < self.h / 4 and self.state in (WARNING, DRIFT):
            return self._move(OK)
        return None

    def _move(self, state: str) -> str | None:
        if state == self.state:
            return None
        self.state = state
        return state

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "statistic": round(self.statistic, 4),
            "threshold": self.h,
            "requests": self.requests,
            "baseline_mean_kld": None if self.mu is None else math.exp(self.mu) - _EPS,
        }
