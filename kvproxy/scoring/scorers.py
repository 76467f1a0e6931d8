"""The shadow pool's scorers: in process (exact, on a low-priority thread) and for HTTP primaries.

For an HTTP primary, what the reference is is found out once: a kvproxy scoring server (``kvproxy
backend``) answers ``/kvproxy/v1/info`` and scores exactly; a plain llama-server says 404 there and
is scored per position from its top-K logprobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvproxy.backends.row_capture import RowCapture
from kvproxy.backends.worker import close_on
from kvproxy.config import ScorePath
from kvproxy.kld import PositionScores
from kvproxy.priority import lower_thread_priority
from kvproxy.scoring.cached_prefix import Prompt, replay_calls
from kvproxy.scoring.captured import PIPELINE_JOBS
from kvproxy.scoring.embedded import EmbeddedScorer, ScoreRequest
from kvproxy.scoring.job import PrimaryReport, ShadowJob, SkipJob
from kvproxy.scoring.llama_server import (
    LlamaServerReference,
    chat_prompt,
    prompt_tokens_chat,
    prompt_tokens_text,
    tokenize_answer,
)
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.scoring.score_client import ScoreRouteReference, probe_score_route
from kvproxy.upstream.message_delimiters import DelimiterCache
from kvproxy.upstream.replicas import ReplicaPool

Reference = LlamaServerReference | ScoreRouteReference
# a conversation with more earlier turns than this is not replayed from a cached prefix: each
# earlier turn costs the primary a template render and a tokenization per job
MAX_EARLIER_TURNS = 32

log = logging.getLogger(__name__)


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
    """Scores an HTTP primary's job: the primary tokenizes the prompt, the reference scores.

    The generated token ids come from the primary's logprobs where the request had them (the client
    asked, or the deployment's opt-in ``primary_logprobs``); otherwise from the answer's text,
    re-tokenized by the primary's own tokenizer (labelled ``retokenized``). That is exact only when
    the model emitted the canonical tokenization of its text (24 of 24 answers on Gemma 3 270M,
    docs/reference-design.md): a count that differs from what the primary generated is detected and skipped
    (``retokenize_mismatch``); the same count made of other tokens is not detectable.
    """

    def __init__(self, primary: ReplicaPool, reference: ReferenceResolver) -> None:
        self.primary = primary
        self.reference = reference
        self.delimiters = DelimiterCache()  # each primary replica's chat message delimiters

    async def score(self, job: ShadowJob) -> PositionScores:
        reference = await self.reference.resolve()
        report = job.report
        if report is None:
            raise ValueError("an HTTP primary's job carries what the primary reported")
        if isinstance(reference, LlamaServerReference) and report.top_k < reference.top_k:
            # the top-K estimator compares the primary's top K with the reference's: without them
            # (not asked, or fewer than K) there is nothing to compare
            raise SkipJob(report.skip_hint)
        source = "logprobs"
        if not report.token_ids:
            report = await self._retokenized(report)
            source = "retokenized"
        template = job.source or {}
        replays_cuts = isinstance(reference, ScoreRouteReference) and reference.replays_prompt_cuts
        starts: list[int] = []  # user-message starts: llama-server cut the prompt there (Jinja only)
        if "messages" in template and replays_cuts:
            prompt, starts = await chat_prompt(self.primary, template, self.delimiters)
        elif "messages" in template:
            prompt = await prompt_tokens_chat(self.primary, template)
        else:
            prompt = await prompt_tokens_text(self.primary, template.get("prompt", ""))
        if isinstance(reference, ScoreRouteReference):
            calls = None
            if replays_cuts and (report.cache_n or 0) > 0:
                calls = await self._cached_calls(
                    reference, template, Prompt(tuple(prompt), tuple(starts)), report
                )
            scores = await reference.score(prompt, report, user_starts=starts, calls=calls)
        else:
            scores = await reference.score(prompt, report)
        return dataclasses.replace(scores, ids_source=source)

    async def _cached_calls(
        self, reference: ScoreRouteReference, template: dict[str, Any], prompt: Prompt, report: PrimaryReport
    ) -> tuple[tuple[int, int], ...]:
        """The primary's calls for a prompt it started from a cached prefix of ``report.cache_n``
        tokens, from the conversation's earlier requests (kvproxy.scoring.cached_prefix); a skip
        (``unreplayable``) when no guess at what its slot held predicts that prefix."""
        cache_n = report.cache_n or 0
        fill = reference.prompt_fill
        if fill is None or not reference.replays_cached_prefixes:
            raise SkipJob("unreplayable")
        messages = template.get("messages")
        messages = messages if isinstance(messages, list) else []
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if len(turns) > MAX_EARLIER_TURNS:
            raise SkipJob("unreplayable")
        earlier = []
        for i in turns:  # each earlier request: the conversation up to that answer, as it was sent
            tokens, starts = await chat_prompt(
                self.primary, {**template, "messages": messages[:i]}, self.delimiters
            )
            earlier.append(Prompt(tuple(tokens), tuple(starts)))
        calls = replay_calls(fill, earlier, prompt, cache_n)
        if calls is None:
            log.debug(
                "shadow job unreplayable: the primary reused %d of %d prompt tokens, which no earlier "
                "request of this conversation (%d) explains",
                cache_n,
                prompt.n,
                len(earlier),
            )
            raise SkipJob("unreplayable")
        return calls

    async def _retokenized(self, report: PrimaryReport) -> PrimaryReport:
        """The answer's token ids from its text (the primary's tokenizer, no special tokens parsed:
        llama-server writes control tokens as nothing), checked against the count generated."""
        if report.unscorable is not None:
            raise SkipJob(report.unscorable)
        expected = report.generated
        if expected is None:
            raise SkipJob("no_token_count")
        ids = await tokenize_answer(self.primary, "".join(report.text))
        # an end-of-generation token is counted but writes no text; a stop string's tokens are
        # counted and cut from the text (a count that still fits scores a true prefix)
        fits = len(ids) == expected - 1 if report.finish_reason == "stop" else len(ids) == expected
        if not fits or not ids:
            raise SkipJob("retokenize_mismatch")
        return PrimaryReport(token_ids=ids, completion_tokens=len(ids), finish_reason=report.finish_reason)


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
        """How many queued jobs one :meth:`score_many` call takes (the shadow pool asks): the lockstep
        sequences of the batched decode path, or with one sequence on the decode path
        :data:`PIPELINE_JOBS`, so that each captured job's last KLD overlaps the next one's decode
        (kvproxy.scoring.captured) instead of the scorer waiting for it between jobs."""
        scorer = self._scorer
        if scorer is None:
            return 1
        if scorer.max_sequences == 1 and scorer.path is ScorePath.DECODE:
            return PIPELINE_JOBS
        return scorer.max_sequences

    async def score(self, job: ShadowJob) -> PositionScores:
        result = (await self.score_many([job]))[0]
        if isinstance(result, ValueError):
            raise result
        return result

    async def score_many(self, jobs: Sequence[ShadowJob]) -> list[PositionScores | ValueError]:
        """Several jobs in one pass: those with usable captured rows against them (the reference
        alone decodes), the rest replayed (lockstep sequences on the batched decode path). One
        job's ValueError in its place; a llama.cpp failure raises for all."""

        def run() -> list[PositionScores | ValueError]:
            scorer = self._get()
            out: list[PositionScores | ValueError | None] = [None] * len(jobs)
            replay: list[int] = []
            captured: list[int] = []
            items: list[tuple[ScoreRequest, RowCapture]] = []
            for i, job in enumerate(jobs):
                capture = job.captured
                if capture is None:
                    replay.append(i)
                    continue
                usable = capture.usable(len(job.token_ids))
                capture.budget.count(usable)
                if usable:
                    captured.append(i)
                    items.append((ScoreRequest(job.prompt_tokens, job.token_ids), capture))
                else:  # out of capture budget: today's replay of the primary config
                    capture.release()
                    replay.append(i)
            try:
                if items:  # one pipeline (kvproxy.scoring.captured)
                    for i, r in zip(captured, scorer.score_captured_many(items), strict=True):
                        out[i] = r
            finally:  # after the pipeline: no KLD reads the captured blocks any more
                for _request, capture in items:
                    capture.release()
            if replay:
                done = scorer.score_batch(
                    [ScoreRequest(jobs[i].prompt_tokens, jobs[i].token_ids) for i in replay]
                )
                for i, r in zip(replay, done, strict=True):
                    out[i] = r
            return [r if r is not None else ValueError("not scored") for r in out]

        results = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        return [
            r if isinstance(r, ValueError) else dataclasses.replace(r, ids_source="primary") for r in results
        ]

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
