"""The drift detector on synthetic per-request means with the spread measured on Gemma 3 270M."""

from __future__ import annotations

import numpy as np

from kvproxy.shadow.drift import DRIFT, OK, WARMUP, DriftDetector

# per-request mean KLD on Gemma 3 270M (calibration): q8_0 about 0.0097, q4_0 about 0.12; the
# log of per-chunk means spreads by about 0.5 (sigma), so requests are drawn lognormal around those
Q8, Q4, LOG_SIGMA = 0.0097, 0.121, 0.5


def requests(mean: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(np.log(mean), LOG_SIGMA, n))


def run(values: np.ndarray, detector: DriftDetector) -> list[tuple[int, str]]:
    return [(i, s) for i, v in enumerate(values) if (s := detector.update(float(v))) is not None]


def test_warmup_then_ok() -> None:
    d = DriftDetector(warmup=50)
    changes = run(requests(Q8, 50, 0), d)
    assert d.state == OK and changes == [(49, OK)]
    assert DriftDetector().state == WARMUP


def test_a_switch_from_q8_0_to_q4_0_is_flagged_within_a_few_requests() -> None:
    delays = []
    for seed in range(50):
        d = DriftDetector()
        run(requests(Q8, 100, seed), d)
        if d.state == DRIFT:
            continue  # a false alarm before the switch is measured in the next test
        after = run(requests(Q4, 50, 1000 + seed), d)
        first_drift = next(i for i, s in after if s == DRIFT)
        delays.append(first_drift + 1)
    assert max(delays) <= 5  # q4_0 is 12x q8_0: about 5 sigma a request on the log scale
    print(f"requests to flag q8_0 -> q4_0: median {np.median(delays)}, max {max(delays)}")


def test_false_alarms_on_a_long_stable_run() -> None:
    alarms = 0
    runs, length = 20, 5000
    for seed in range(runs):
        d = DriftDetector()
        alarms += sum(1 for _, s in run(requests(Q4, length, seed), d) if s == DRIFT)
    print(f"false alarms: {alarms} in {runs * length} stable requests")
    assert alarms == 0  # measured with these seeds; stated in docs/drift.md


def test_returns_to_ok_after_the_drift_ends() -> None:
    d = DriftDetector.from_baseline(Q8, LOG_SIGMA)
    changes = run(np.concatenate([requests(Q4, 30, 1), requests(Q8, 100, 2)]), d)
    states = [s for _, s in changes]
    assert DRIFT in states and states[-1] == OK
