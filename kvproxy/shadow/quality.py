"""Online KLD statistics for one deployment: since start and over a recent window, in bounded memory.

Since start: exact running sums (mean ± error, same-top ± error, RMS Δp, max) plus a fixed
log-spaced histogram for the median and percentiles (bins 2.5 % wide from 1e-7 to 100, values
interpolated inside a bin; memory is constant however long the process runs).
Recent window: the last ``window`` scored positions kept as values, so its statistics are exact.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from kvproxy.kld import (
    KLDSummary,
    PositionScores,
    mean_and_error,
    rms_and_error,
    same_top_rate,
    summarize,
)

_HIST_LO, _HIST_HI, _HIST_BINS = 1e-7, 100.0, 840  # 840 bins over 9 decades: ~2.5 % per bin


@dataclass
class _Running:
    count: int = 0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    n_same_top: int = 0
    sum_dp2: float = 0.0
    sum_dp4: float = 0.0
    max_kld: float = 0.0


class QualityTracker:
    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._run = _Running()
        self._edges = np.geomspace(_HIST_LO, _HIST_HI, _HIST_BINS + 1)
        # counts[0]: values below the first edge (including exact zeros); counts[-1]: above the last
        self._counts = np.zeros(_HIST_BINS + 2, dtype=np.int64)
        self._recent_kld: deque[float] = deque(maxlen=window)
        self._recent_same: deque[bool] = deque(maxlen=window)
        self._recent_pref: deque[float] = deque(maxlen=window)
        self._recent_pq: deque[float] = deque(maxlen=window)
        # the window's statistics (a p99 over up to 4,096 values, ~0.35 ms) are read by the status
        # route and the KLD history alike: computed once per change of the window
        self._recent: KLDSummary | None = None

    @property
    def tokens(self) -> int:
        return self._run.count

    def add(self, scores: PositionScores) -> None:
        kld = np.asarray(scores.kld, dtype=np.float64)
        if kld.size == 0:
            return
        self._recent = None
        dp2 = scores.delta_p**2
        r = self._run
        r.count += int(kld.size)
        r.sum_kld += float(kld.sum())
        r.sum_kld2 += float((kld * kld).sum())
        r.n_same_top += int(np.count_nonzero(scores.same_top))
        r.sum_dp2 += float(dp2.sum())
        r.sum_dp4 += float((dp2 * dp2).sum())
        r.max_kld = max(r.max_kld, float(kld.max()))
        np.add.at(self._counts, np.searchsorted(self._edges, kld, side="right"), 1)
        self._recent_kld.extend(kld.tolist())
        self._recent_same.extend(scores.same_top.tolist())
        self._recent_pref.extend(scores.p_ref.tolist())
        self._recent_pq.extend(scores.p_primary.tolist())

    def _hist_quantile(self, fraction: float) -> float:
        """Quantile from the histogram, linear inside a bin (geometric bins: log-linear)."""
        n = self._run.count
        if n == 0:
            return math.nan
        target = fraction * (n - 1)
        cum = np.cumsum(self._counts)
        b = int(np.searchsorted(cum, target, side="right"))
        if b == 0:
            return 0.0 if self._counts[0] else _HIST_LO
        if b >= _HIST_BINS + 1:
            return self._run.max_kld
        lo, hi = self._edges[b - 1], self._edges[b]
        before = cum[b - 1]
        inside = (target - before + 0.5) / self._counts[b]
        value = float(lo * (hi / lo) ** min(max(inside, 0.0), 1.0))
        return min(value, self._run.max_kld)

    def histogram(self, merge: int = 30) -> dict[str, object]:
        """The since-start distribution in coarser bins (``merge`` fine bins each: by default 28 bins,
        each 9/28 of a decade wide) for the live quality page. ``underflow`` counts values below the
        first edge (exact zeros included), ``overflow`` those above the last; with ``counts`` they
        add up to ``tokens``."""
        if _HIST_BINS % merge:
            raise ValueError(f"{merge} does not divide the {_HIST_BINS} bins")
        inner = self._counts[1:-1].reshape(-1, merge).sum(axis=1)
        return {
            "edges": [float(x) for x in self._edges[::merge]],
            "counts": [int(x) for x in inner],
            "underflow": int(self._counts[0]),
            "overflow": int(self._counts[-1]),
            "tokens": self._run.count,
        }

    def since_start(self) -> KLDSummary:
        r = self._run
        mean, err = mean_and_error(r.sum_kld, r.sum_kld2, r.count)
        top, top_err = same_top_rate(r.n_same_top, r.count)
        rms, rms_err = rms_and_error(r.sum_dp2, r.sum_dp4, r.count)
        nan = math.nan
        return KLDSummary(
            tokens=r.count,
            mean=mean if r.count else nan,
            mean_error=err if r.count else nan,
            median=self._hist_quantile(0.5),
            p90=self._hist_quantile(0.90),
            p95=self._hist_quantile(0.95),
            p99=self._hist_quantile(0.99),
            p999=self._hist_quantile(0.999),
            max=r.max_kld if r.count else nan,
            same_top=top,
            same_top_error=top_err,
            rms_delta_p=rms,
            rms_delta_p_error=rms_err,
        )

    def recent(self) -> KLDSummary:
        if self._recent is None:
            self._recent = summarize(
                PositionScores(
                    np.fromiter(self._recent_kld, dtype=np.float64, count=len(self._recent_kld)),
                    np.fromiter(self._recent_same, dtype=bool, count=len(self._recent_same)),
                    np.fromiter(self._recent_pref, dtype=np.float64, count=len(self._recent_pref)),
                    np.fromiter(self._recent_pq, dtype=np.float64, count=len(self._recent_pq)),
                )
            )
        return self._recent
