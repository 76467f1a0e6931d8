"""The shadow path's accounting: sampled = scored + failed + dropped (+ queued + in flight)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from kvproxy.api.shadow_ask import parse_shadow_header
from kvproxy.kld import PositionScores
from kvproxy.shadow.pool import ShadowJob, ShadowPool, ShadowSampler
from kvproxy.shadow.quality import QualityTracker


class FakeScorer:
    """Fault injection only: a scorer that can block, fail, or return fixed scores."""

    def __init__(self, fail_every: int = 0) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_every = fail_every
        self.calls = 0

    async def score(self, job: ShadowJob) -> PositionScores:
        self.calls += 1
        await self.gate.wait()
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("injected scorer failure")
        n = len(job.token_ids)
        return PositionScores(np.full(n, 0.1), np.ones(n, dtype=bool), np.full(n, 0.5), np.full(n, 0.4))


def accounted(pool: ShadowPool) -> int:
    c = pool.counters
    return c.scored + c.failed + c.dropped + pool.queued + pool.in_flight


def test_sampler_rate_and_header() -> None:
    sampler = ShadowSampler(0.25, random.Random(0))
    picks = sum(sampler.decide(None) for _ in range(4000))
    assert 850 < picks < 1150
    assert ShadowSampler(0.0).decide("force") and not ShadowSampler(1.0).decide("skip")
    assert not any(ShadowSampler(0.0).decide(None) for _ in range(100))
    assert all(ShadowSampler(1.0).decide(None) for _ in range(100))
    assert parse_shadow_header(" FORCE ") == "force" and parse_shadow_header(None) is None
    with pytest.raises(ValueError, match="force"):
        parse_shadow_header("always")
    with pytest.raises(ValueError):
        ShadowSampler(1.5)


def test_full_queue_drops_and_counts() -> None:
    async def run() -> None:
        scorer = FakeScorer()
        scorer.gate.clear()  # the worker blocks on the first job
        pool = ShadowPool(scorer, QualityTracker(), queue_size=2, concurrency=1)
        pool.start()
        for _ in range(6):
            pool.ticket().submit(ShadowJob((1, 2), (3, 4, 5)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert pool.in_flight == 1 and pool.queued == 2 and pool.counters.dropped == 3
        assert accounted(pool) == pool.counters.sampled == 6
        scorer.gate.set()
        await pool.drain()
        assert pool.counters.scored == 3 and pool.counters.scored_tokens == 9
        assert pool.tracker.tokens == 9
        assert accounted(pool) == 6
        await pool.stop()

    asyncio.run(run())


def test_failures_are_counted_and_do_not_stop_the_workers() -> None:
    async def run() -> None:
        pool = ShadowPool(FakeScorer(fail_every=2), QualityTracker(), queue_size=100, concurrency=2)
        pool.start()
        for _ in range(10):
            pool.ticket().submit(ShadowJob((1,), (2,)))
        await pool.drain()
        assert pool.counters.failed == 5 and pool.counters.scored == 5
        assert accounted(pool) == pool.counters.sampled == 10
        await pool.stop()

    asyncio.run(run())


def test_abandoned_tickets_and_shutdown_count_as_dropped() -> None:
    async def run() -> None:
        scorer = FakeScorer()
        scorer.gate.clear()
        pool = ShadowPool(scorer, QualityTracker(), queue_size=10)
        pool.start()
        pool.ticket().abandon()  # the response never finished
        t = pool.ticket()
        t.submit(ShadowJob((1,), (2,)))
        t.abandon()  # after submit: a no-op
        pool.ticket().submit(ShadowJob((1,), (2,)))
        await asyncio.sleep(0.01)
        await pool.stop()  # one in flight, one queued: both dropped
        assert pool.counters.dropped == 3 and pool.counters.sampled == 3
        assert accounted(pool) == 3

    asyncio.run(run())
