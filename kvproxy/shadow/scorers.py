"""The shadow pool's scorers: in process (exact, on a low-priority thread) and for HTTP primaries.

For an HTTP primary, what the reference is is found out once: a kvproxy scoring server (``kvproxy
backend``) answers ``/kvproxy/v1/info`` and scores exactly; a plain llama-server says 404 there and
is scored per position from its top-K logprobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvproxy.backends.embedded_scorer import EmbeddedScorer, ScoreRequest
from kvproxy.backends.prompt_fill import PromptFill
from kvproxy.backends.worker import close_on
from kvproxy.kld import PositionScores
from kvproxy.priority import lower_thread_priority
from kvproxy.shadow.job import ShadowJob
from kvproxy.upstream.llama_server import LlamaServerReference, prompt_tokens_chat, prompt_tokens_text
from kvproxy.upstream.replicas import ReplicaPool
from kvproxy.upstream.score_client import ScoreRouteReference, probe_score_route

Reference = LlamaServerReference | ScoreRouteReference


class ReferenceResolver:
    """Which kind of reference a pool is: asked at start-up and, if it could not be reached then,
    again before the first job (a connection error fails that job and is asked again)."""

    def __init__(self, pool: ReplicaPool, *, top_k: int, prompt_fill: PromptFill | None = None) -> None:
        self.pool = pool
        self.top_k = top_k
        self.prompt_fill = (
            prompt_fill  # how the primary llama-servers cut prompts (a scoring server mirrors it)
        )
        self.reference: Reference | None = None

    @property
    def estimator(self) -> str:
        if self.reference is None:
            return "undetermined"
        return "exact" if isinstance(self.reference, ScoreRouteReference) else f"top-{self.top_k}"

    @property
    def score_path(self) -> str:
        """A scoring server says its own; a plain llama-server scores per position, one token a
        step on cached prefixes, against the rows the primary served: the decode path."""
        if self.reference is None:
            return "undetermined"
        if isinstance(self.reference, ScoreRouteReference):
            return self.reference.info.score_path
        return "decode"

    async def resolve(self) -> Reference:
        if self.reference is None:
            info = await probe_score_route(self.pool)
            self.reference = (
                ScoreRouteReference(self.pool, info, prompt_fill=self.prompt_fill)
                if info is not None
                else LlamaServerReference(self.pool, top_k=self.top_k)
            )
        return self.reference


class HttpScorer:
    """Scores an HTTP primary's job: the primary tokenizes the prompt, the reference scores."""

    def __init__(self, primary: ReplicaPool, reference: ReferenceResolver) -> None:
        self.primary = primary
        self.reference = reference

    async def score(self, job: ShadowJob) -> PositionScores:
        reference = await self.reference.resolve()
        if job.report is None:
            raise ValueError("an HTTP primary's job carries what the primary reported")
        source = job.source or {}
        if "messages" in source:
            prompt = await prompt_tokens_chat(self.primary, source["messages"])
        else:
            prompt = await prompt_tokens_text(self.primary, source.get("prompt", ""))
        return await reference.score(prompt, job.report)


class ThreadedScorer:
    """The async face of :class:`EmbeddedScorer`: scoring runs on one low-priority worker thread."""

    def __init__(self, factory: Callable[[], EmbeddedScorer]) -> None:
        self._factory = factory
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvproxy-shadow", initializer=lower_thread_priority
        )
        self._scorer: EmbeddedScorer | None = None

    async def start(self) -> EmbeddedScorer:
        """Create the scoring contexts now (on the worker thread), so start-up fails early."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._get)

    def _get(self) -> EmbeddedScorer:
        if self._scorer is None:
            self._scorer = self._factory()
        return self._scorer

    @property
    def max_jobs(self) -> int:
        """How many queued jobs one :meth:`score_many` call takes (the shadow pool asks)."""
        return self._scorer.max_sequences if self._scorer is not None else 1

    async def score(self, job: ShadowJob) -> PositionScores:
        return await self.score_request(ScoreRequest(job.prompt_tokens, job.token_ids))

    async def score_many(self, jobs: Sequence[ShadowJob]) -> list[PositionScores | ValueError]:
        """Several jobs in one pass (lockstep sequences on the batched decode path)."""
        requests = [ScoreRequest(j.prompt_tokens, j.token_ids) for j in jobs]

        def run() -> list[PositionScores | ValueError]:
            return self._get().score_batch(requests)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def score_request(self, request: ScoreRequest) -> PositionScores:
        """One job given as tokens (the score route's), on the worker thread."""

        def run() -> PositionScores:
            return self._get().score(
                request.prompt, request.completion, request.check_ids, request.prompt_fill
            )

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        close_on(self._executor, self._scorer)
        self._scorer = None
