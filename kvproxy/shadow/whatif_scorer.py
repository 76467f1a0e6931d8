"""The what-if on the shadow path: after a job's served config is scored, replay it under each candidate.

:class:`WhatIfScorer` is the deployment's :class:`~kvproxy.scoring.scorers.ThreadedScorer` with the
what-if after each job it scores: shadow jobs in process (``kvproxy serve``) and score-route jobs
(``kvproxy backend``, a proxy's reference). So the what-if obeys the shadow budget: it runs on the
shadow worker's time, never on a client's request; while it runs, new shadow jobs wait in the
bounded shadow queue and are dropped and counted when it is full. It also gives way first: a job
sampled for the what-if while other scoring work waits (shadow jobs queued, or another score
request for the scoring thread) is *shed* and counted, and the served config is scored as always.

The replay runs on its own thread at the shadow worker's low priority (kvproxy.priority), one job
at a time; a failure is counted and logged and never fails the job's own scores.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvproxy.backends.worker import close_on
from kvproxy.kld import PositionScores
from kvproxy.priority import lower_thread_priority
from kvproxy.scoring.embedded import EmbeddedScorer, ScoreRequest
from kvproxy.scoring.job import ShadowJob
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.scoring.scorers import ThreadedScorer
from kvproxy.scoring.whatif_replay import WhatIfReplay
from kvproxy.shadow.whatif import WhatIfTracker

log = logging.getLogger(__name__)


class WhatIf:
    """One deployment's what-if: which jobs, the replay (created on its thread), the statistics."""

    def __init__(
        self,
        factory: Callable[[], WhatIfReplay],
        tracker: WhatIfTracker,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._factory = factory
        self.tracker = tracker
        self._rng = rng or random.Random()
        self._replay: WhatIfReplay | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvproxy-whatif", initializer=lower_thread_priority
        )
        # how many scoring jobs wait besides the one just scored (set by the deployment: its shadow
        # queue); the score route's own waiting requests are counted by WhatIfScorer
        self.backlog: Callable[[], int] = lambda: 0

    def _get(self) -> WhatIfReplay:
        if self._replay is None:
            self._replay = self._factory()
        return self._replay

    async def start(self) -> None:
        """Create the candidates' contexts now, so a config llama.cpp refuses stops start-up."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._get)

    def sampled(self) -> bool:
        rate = self.tracker.rate
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    async def after(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        fill: PromptFill | None,
        served: PositionScores,
        waiting: int = 0,
    ) -> None:
        """The what-if of one job whose served config scored ``served``; never raises."""
        if not self.sampled():
            self.tracker.count("not_sampled")
            return
        if waiting or self.backlog():
            self.tracker.count("shed")
            return

        def run() -> list[PositionScores]:
            return self._get().score(prompt, completion, fill)

        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, run)
            self.tracker.add(served, results)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.tracker.count("failed")
            log.warning("what-if scoring failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        close_on(self._executor, self._replay)
        self._replay = None


class WhatIfScorer(ThreadedScorer):
    """A :class:`ThreadedScorer` that runs the deployment's what-if after each job it scores."""

    def __init__(self, factory: Callable[[], EmbeddedScorer], whatif: WhatIf) -> None:
        super().__init__(factory)
        self.whatif = whatif
        self._requests = 0  # score requests in this scorer now (the one being scored included)

    async def start(self) -> EmbeddedScorer:
        scorer = await super().start()
        await self.whatif.start()
        return scorer

    async def score(self, job: ShadowJob) -> PositionScores:
        return await super().score(job)  # through score_many (or score_request), which run the what-if

    async def score_request(self, request: ScoreRequest) -> PositionScores:
        self._requests += 1
        try:
            scores = await super().score_request(request)
        finally:
            self._requests -= 1
        if len(scores):
            await self.whatif.after(
                request.prompt, request.completion, request.prompt_fill, scores, waiting=self._requests
            )
        return scores

    async def score_many(self, jobs: Sequence[ShadowJob]) -> list[PositionScores | ValueError]:
        results = await super().score_many(jobs)
        for job, r in zip(jobs, results, strict=True):
            if not isinstance(r, ValueError) and len(r):
                await self.whatif.after(job.prompt_tokens, job.token_ids, None, r)
        return results

    def close(self) -> None:
        self.whatif.close()  # its contexts go before the model they share, with the scorer's
        super().close()
