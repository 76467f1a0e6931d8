"""The guard's state machine: drift engages it, ok plus the hold time releases it, warning waits."""

from __future__ import annotations

from kvproxy.shadow.drift import DRIFT, OK, WARMUP, WARNING
from kvproxy.shadow.guard import FALLBACK, PRIMARY, Guard


def test_drift_engages_and_ok_after_the_hold_releases() -> None:
    g = Guard("safe", min_hold_seconds=30)
    assert g.evaluate(WARMUP, 0) is None and g.evaluate(OK, 1) is None and g.evaluate(WARNING, 2) is None
    assert not g.active
    assert g.evaluate(DRIFT, 10) == FALLBACK and g.active
    assert g.evaluate(DRIFT, 11) is None  # no double count while drifting
    assert g.evaluate(WARNING, 50) is None and g.active  # warning is not ok: stays on the fallback
    assert g.evaluate(OK, 39.9) is None and g.active  # ok, but inside the hold time
    assert g.evaluate(OK, 40) == PRIMARY and not g.active
    assert (g.to_fallback, g.to_primary) == (1, 1)


def test_status_reports_route_switches_and_time() -> None:
    g = Guard("safe", min_hold_seconds=5)
    g.evaluate(DRIFT, 100)
    st = g.status(now=103)
    assert st["active"] is True and st["serving"] == FALLBACK and st["fallback"] == "safe"
    assert st["seconds_since_switch"] == 3 and st["switches"] == {"to_fallback": 1, "to_primary": 0}
    assert st["probes"] == {"started": 0, "skipped": 0, "failed": 0}
    assert Guard("safe").status(now=0)["seconds_since_switch"] is None
