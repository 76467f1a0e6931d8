"""The loop-load watch and what the shadow path does with it: shed new samples, defer queued jobs."""

from __future__ import annotations

import asyncio
import time

from kvproxy.kld import PositionScores
from kvproxy.shadow.ask import FORCE
from kvproxy.shadow.loadwatch import loop_load
from kvproxy.shadow.pool import ShadowJob, ShadowPool
from kvproxy.shadow.quality import QualityTracker


class _NeverCalled:
    async def score(self, job: ShadowJob) -> PositionScores:
        raise AssertionError("a saturated proxy must not score")


def test_a_saturated_loop_sheds_samples_and_drops_deferred_jobs() -> None:
    async def run() -> None:
        pool = ShadowPool(_NeverCalled(), QualityTracker(window=16), max_defer=0.2)
        pool.start()
        watch = loop_load()
        await asyncio.sleep(0.05)
        assert not watch.busy and watch.lag < 0.002
        ticket = pool.ticket()
        assert ticket is not None  # calm: sampled
        for _ in range(20):  # clients hog the loop: 20 ms of work between two timer ticks
            time.sleep(0.02)
            await asyncio.sleep(0)
        assert watch.busy, watch.lag
        assert pool.ticket() is None and pool.counters.shed == 1  # busy: not sampled, counted
        assert pool.ticket(FORCE) is not None  # a forced request is still scored
        ticket.submit(ShadowJob(source={}, report=None))  # queued while busy ...
        deadline = time.monotonic() + 2
        while pool.counters.dropped < 1:  # ... and dropped after max_defer without being scored
            time.sleep(0.02)
            await asyncio.sleep(0)
            assert time.monotonic() < deadline
        await pool.stop()
        await watch.stop()

    asyncio.run(run())
