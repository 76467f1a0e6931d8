"""QualityTracker: exact running statistics, histogram percentiles close to exact, bounded window."""

from __future__ import annotations

import numpy as np
import pytest

from kvproxy.kld import PositionScores, summarize
from kvproxy.shadow.quality import QualityTracker


def scores(n: int, seed: int) -> PositionScores:
    rng = np.random.default_rng(seed)
    p_ref = rng.uniform(size=n)
    return PositionScores(
        rng.lognormal(-3, 1.5, n),
        rng.uniform(size=n) < 0.85,
        p_ref,
        np.clip(p_ref + rng.normal(0, 0.1, n), 0, 1),
    )


def test_since_start_equals_the_summary_of_everything() -> None:
    tracker = QualityTracker(window=100)
    batches = [scores(n, seed) for seed, n in enumerate((300, 1, 700, 2000))]
    for b in batches:
        tracker.add(b)
    exact = summarize(PositionScores.concat(batches))
    got = tracker.since_start()
    assert got.tokens == exact.tokens == 3001
    for field in (
        "mean",
        "mean_error",
        "max",
        "same_top",
        "same_top_error",
        "rms_delta_p",
        "rms_delta_p_error",
    ):
        assert getattr(got, field) == pytest.approx(getattr(exact, field), rel=1e-9), field
    for field in ("median", "p90", "p95", "p99"):  # from the log-spaced histogram: within a bin
        assert getattr(got, field) == pytest.approx(getattr(exact, field), rel=0.03), field


def test_recent_window_keeps_only_the_last_tokens() -> None:
    tracker = QualityTracker(window=500)
    old, new = scores(1000, 1), scores(800, 2)
    tracker.add(old)
    tracker.add(new)
    tail = PositionScores(new.kld[-500:], new.same_top[-500:], new.p_ref[-500:], new.p_primary[-500:])
    assert tracker.recent() == summarize(tail)
    assert tracker.since_start().tokens == 1800


def test_zero_kld_lands_in_the_lowest_bin() -> None:
    tracker = QualityTracker()
    zeros = np.zeros(10)
    tracker.add(PositionScores(zeros, np.ones(10, dtype=bool), zeros, zeros))
    s = tracker.since_start()
    assert s.median == 0.0 and s.mean == 0.0 and s.same_top == 1.0
