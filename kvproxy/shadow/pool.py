"""The shadow path: decide which requests are scored, queue their tokens, score them off the request path.

* :class:`ShadowSampler` decides at once, per request (a rate, or the ``X-KVProxy-Shadow`` header).
* A sampled request holds a :class:`ShadowTicket`; when its response has ended the ticket submits a
  :class:`ShadowJob` (prompt token ids, generated token ids) to the :class:`ShadowPool` with a
  non-blocking put, so the client's response never waits on the shadow path. A response that did not
  finish (client gone, backend error) or a full queue drops the job, and the drop is counted.
* The pool's workers score jobs through a :class:`Scorer` and feed the deployment's
  :class:`~kvproxy.shadow.quality.QualityTracker`. A scorer failure is counted, logged and never reaches
  a client. A scorer with ``score_many`` (:class:`~kvproxy.scoring.job.BatchScorer`) is handed what is
  queued, up to its ``max_jobs``, in one call: the batched decode path scores them as sequences of one
  context.

Accounting invariant, at any moment: ``sampled = scored + failed + dropped + queued + in_flight``. A
job that cannot be scored although nothing failed (the answer holds tool calls, the estimator needs
logprobs that were not asked for, ...) is *skipped*: counted as dropped, and by its reason
(``skipped``; kvproxy.scoring.job.SKIP_REASONS).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvproxy.kld import PositionScores
from kvproxy.observers import NULL_SHADOW, ShadowEvents
from kvproxy.scoring.job import SKIP_REASONS, BatchScorer, Scorer, ShadowJob, SkipJob
from kvproxy.scoring.kept import DROPPED, FAILED, KeptScores
from kvproxy.shadow.ask import NO_ASK, ShadowAsk, ShadowDirective
from kvproxy.shadow.capacity import ScoringCapacity
from kvproxy.shadow.loadwatch import LoopLoad, loop_load
from kvproxy.shadow.quality import QualityTracker
from kvproxy.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass
class ShadowCounters:
    sampled: int = 0
    scored: int = 0
    failed: int = 0
    dropped: int = 0
    shed: int = 0  # not sampled: the proxy was saturated (kvproxy.shadow.loadwatch); not part of `sampled`
    scored_tokens: int = 0
    last_lag_seconds: float | None = None  # response end -> score done, for the last job
    # dropped jobs that could not be scored, by reason (part of `dropped`)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    # scored jobs by where their generated token ids came from (kvproxy.scoring.job.ID_SOURCES)
    token_ids: dict[str, int] = field(default_factory=dict)


class ShadowSampler:
    def __init__(self, rate: float, rng: random.Random | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow rate must be within 0..1, not {rate}")
        self.rate = rate
        self._rng = rng or random.Random()

    def decide(self, directive: ShadowDirective | None) -> bool:
        if directive == "force":
            return True
        if directive == "skip":
            return False
        return self.rate >= 1.0 or (self.rate > 0.0 and self._rng.random() < self.rate)


class ShadowPool:
    """A bounded queue and ``concurrency`` worker tasks in front of one scorer."""

    def __init__(
        self,
        scorer: Scorer,
        tracker: QualityTracker,
        *,
        queue_size: int = 64,
        concurrency: int = 1,
        events: ShadowEvents = NULL_SHADOW,
        on_scored: Callable[[PositionScores], None] | None = None,
        max_defer: float = 2.0,
    ) -> None:
        self.scorer = scorer
        self.tracker = tracker
        self.events = events
        self.on_scored = on_scored  # the deployment's drift detector
        self.counters = ShadowCounters()
        self.concurrency = concurrency
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self.in_flight = 0
        self.load: LoopLoad | None = None  # set by start(): the running loop's watch
        self.max_defer = max_defer
        self.capacity = ScoringCapacity()  # the sustainable shadow rate (kvproxy.shadow.capacity)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self.load = loop_load()
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"kvproxy-shadow-{i}") for i in range(self.concurrency)
            ]

    async def stop(self) -> None:
        """Stop the workers; jobs still queued are counted as dropped."""
        await cancel_and_wait(self._workers)
        self._workers = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self.drop(job.keep)

    def count(self, outcome: str) -> None:
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
        self.events.outcome(outcome)

    def drop(self, keep: KeptScores | None) -> None:
        """A sampled request's job that will not be scored: counted, and its kept slot told."""
        self.count("dropped")
        if keep is not None:
            keep.end(DROPPED)

    def skip(self, reason: str, keep: KeptScores | None) -> None:
        """A job that cannot be scored although nothing failed: dropped, and counted by reason."""
        self.counters.skipped[reason] += 1
        self.events.skipped(reason)
        self.drop(keep)

    @property
    def saturated(self) -> bool:
        """The proxy's loop is saturated (kvproxy.shadow.loadwatch): shadow work gives way to clients."""
        return self.load is not None and self.load.busy

    def ticket(self, ask: ShadowAsk = NO_ASK) -> ShadowTicket | None:
        """A ticket for a sampled request; none while the proxy is saturated (unless forced)."""
        if ask.directive != "force" and self.saturated:
            self.count("shed")
            return None
        self.count("sampled")
        return ShadowTicket(self, ask.claim(), ask.request_id)

    def _offer(self, job: ShadowJob) -> bool:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.drop(job.keep)
            log.debug("shadow queue full: job dropped")
            return False
        return True

    async def _calm(self) -> bool:
        """Wait for a calm loop before scoring (clients first); False after ``max_defer``."""
        waited = 0.0
        while self.saturated:
            if waited >= self.max_defer:
                return False
            await asyncio.sleep(0.01)
            waited += 0.01
        return True

    def _batch_limit(self) -> int:
        """How many queued jobs one scoring call may take: a scorer with ``score_many`` says."""
        if getattr(self.scorer, "score_many", None) is None:
            return 1
        return max(1, int(getattr(self.scorer, "max_jobs", 1)))

    async def _work(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            limit = self._batch_limit()
            while len(jobs) < limit and not self._queue.empty():  # what is queued now, up to the limit
                jobs.append(self._queue.get_nowait())
            self.in_flight += len(jobs)
            try:
                if not await self._calm():
                    while jobs:
                        self.in_flight -= 1
                        self.drop(jobs.pop().keep)
                    log.debug("shadow job dropped: the proxy stayed saturated")
                    continue
                results = await self._score(jobs)
            except asyncio.CancelledError:
                while jobs:
                    self.in_flight -= 1
                    self.drop(jobs.pop().keep)
                raise
            except Exception as exc:
                results = [exc] * len(jobs)
            self._record_all(jobs, results)
            # the jobs hold prompts and completions: let them go now, not when the next job arrives
            # (the loop variables would keep them alive while the queue is idle)
            del jobs, results

    def _record_all(self, jobs: list[ShadowJob], results: Sequence[PositionScores | Exception]) -> None:
        for job, result in zip(jobs, results, strict=True):
            self.in_flight -= 1
            self._record(job, result)

    async def _score(self, jobs: list[ShadowJob]) -> Sequence[PositionScores | Exception]:
        started = time.monotonic()
        if len(jobs) == 1:
            results: Sequence[PositionScores | Exception] = [await self.scorer.score(jobs[0])]
        else:
            results = await cast(BatchScorer, self.scorer).score_many(jobs)  # _batch_limit saw score_many
            if len(results) != len(jobs):
                raise RuntimeError(f"score_many returned {len(results)} results for {len(jobs)} jobs")
        tokens = sum(len(r) for r in results if isinstance(r, PositionScores))
        self.capacity.scored(tokens, time.monotonic() - started, len(jobs))
        return results

    def _record(self, job: ShadowJob, result: PositionScores | Exception) -> None:
        """One job's outcome: its scores into the tracker and observers, or a counted failure."""
        if isinstance(result, SkipJob):
            log.debug("shadow job skipped: %s", result.reason)
            self.skip(result.reason, job.keep)
            return
        if isinstance(result, Exception):
            self.count("failed")
            if job.keep is not None:
                job.keep.end(FAILED)
            # the traceback only at debug level: its frames hold the job (prompt, completion),
            # and a log record kept by a handler would keep them alive
            log.warning(
                "shadow scoring failed: %s: %s (request_id=%s)",
                type(result).__name__,
                str(result),
                job.request_id,
                exc_info=result if log.isEnabledFor(logging.DEBUG) else None,
            )
            return
        scores = result
        if job.keep is not None:
            job.keep.scored(scores)
        self.tracker.add(scores)
        lag = time.monotonic() - job.ended_at
        self.counters.scored_tokens += len(scores)
        self.counters.last_lag_seconds = lag
        if scores.ids_source is not None:
            ids = self.counters.token_ids
            ids[scores.ids_source] = ids.get(scores.ids_source, 0) + 1
        self.count("scored")
        if self.on_scored is not None and len(scores):
            self.on_scored(scores)
        self.events.scored(scores, lag, job.turn)

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait until nothing is queued or being scored (tests, graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.qsize() or self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError("shadow jobs still pending")
            await asyncio.sleep(0.01)


class ShadowTicket:
    """One sampled request's claim on the shadow path: submitted once, or dropped (and counted).

    ``keep``: the request opted in to keeping its per-position scores (kvproxy.shadow.token_scores);
    ``request_id``: the request being served (its x-request-id)."""

    def __init__(
        self, pool: ShadowPool, keep: KeptScores | None = None, request_id: str | None = None
    ) -> None:
        self._pool = pool
        self._settled = False
        self.keep = keep
        self.request_id = request_id
        if keep is not None:
            keep.request_id = self.request_id

    def submit(self, job: ShadowJob) -> None:
        if self._settled:
            return
        self._settled = True
        job = dataclasses.replace(job, keep=self.keep, request_id=self.request_id)
        self._pool._offer(job)

    def abandon(self) -> None:
        """The response did not finish: nothing to score."""
        if not self._settled:
            self._settled = True
            self._pool.drop(self.keep)

    def skip(self, reason: str) -> None:
        """Nothing of this response can be scored (one of kvproxy.scoring.job.SKIP_REASONS)."""
        if not self._settled:
            self._settled = True
            self._pool.skip(reason, self.keep)
