"""What one shadow job carries: the tokens to replay and, for an HTTP primary, what it reported.

A job is dropped as soon as it is scored: it holds the prompt and the completion.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvproxy.kld import PositionScores
from kvproxy.scoring.kept import KeptScores

# Why a sampled job was not scored although nothing failed (a fixed set: a Prometheus label).
SKIP_REASONS = (
    "logprobs_off",  # the top-K estimator needs the primary's logprobs, not asked (primary_logprobs)
    "logprobs_refused",  # tools + stream: llama-server refuses logprobs there, so none were asked
    "tool_calls",  # the answer holds tool calls: llama-server returns no text to re-tokenize
    "reasoning",  # the answer was split into reasoning and content: the raw text is gone
    "several_choices",  # n > 1: only one answer's text can be lined up with the generated count
    "no_token_count",  # neither usage nor timings said how many tokens were generated
    "retokenize_mismatch",  # the answer's text re-tokenized to another count than was generated
    # the primary started from a cached prefix (timings.cache_n > 0) that no guess at what its slot
    # held explains, so no replay computes its rows (kvproxy.scoring.cached_prefix)
    "unreplayable",
)
# Where a scored job's generated token ids came from (a Prometheus label).
ID_SOURCES = ("logprobs", "retokenized", "primary")
# What the scored answer was (a Prometheus label): text, or a turn whose answer holds tool calls.
TURNS = ("text", "tool_call")


class SkipJob(Exception):
    """A scorer's word that a job cannot be scored (one of :data:`SKIP_REASONS`): counted as a skip,
    not as a failure."""

    def __init__(self, reason: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(reason)
        self.reason = reason


@dataclass
class PrimaryReport:
    """What the primary reported for each generated position: the token, and its top-K."""

    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)
    completion_tokens: int | None = None  # from the upstream's usage
    finish_reason: str | None = None
    malformed: bool = False  # an entry without a token id or logprob: nothing can be scored
    # a report without logprobs (the request went to the primary unchanged): the answer's text, to
    # be re-tokenized by the scorer, and what it learnt reading it
    text: list[str] = field(default_factory=list)
    unscorable: str | None = None  # a SKIP_REASONS entry: the text cannot stand for the tokens
    predicted_n: int | None = None  # llama-server's `timings.predicted_n` (sent without usage)
    # llama-server's `timings.cache_n`: prompt tokens it took from the slot's cache, not computed
    cache_n: int | None = None
    top_k: int = 0  # the top list each entry carries at most (what was asked of the primary)
    skip_hint: str = "logprobs_off"  # why no logprobs were asked, for a top-K scorer's skip

    def note_end(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            self.completion_tokens = int(usage["completion_tokens"])
        timings = data.get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("predicted_n"), int):
            self.predicted_n = int(timings["predicted_n"])
        cache_n = timings.get("cache_n") if isinstance(timings, dict) else None
        if isinstance(cache_n, int) and not isinstance(cache_n, bool) and cache_n >= 0:
            self.cache_n = cache_n  # upstream bytes: a bool or a negative count is not a count
        for choice in data.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def note_text(self, data: dict[str, Any]) -> None:
        """The answer's text from one response (or stream chunk), chat or completion, and what
        makes it unfit to re-tokenize: tool calls and reasoning are parsed out of the generated
        text by llama-server, which returns no raw text; several choices cannot be told apart."""
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.unscorable = "several_choices"
                continue
            part = choice.get("message") or choice.get("delta")
            if isinstance(part, dict):
                if part.get("tool_calls") or part.get("function_call"):
                    self.unscorable = "tool_calls"
                if part.get("reasoning_content"):
                    self.unscorable = "reasoning"
                content = part.get("content")
            else:
                content = choice.get("text")
            if isinstance(content, str) and content:
                self.text.append(content)

    @property
    def generated(self) -> int | None:
        """How many tokens the primary generated, as it said (usage, else its timings)."""
        return self.completion_tokens if self.completion_tokens is not None else self.predicted_n

    def aligned(self, *, streamed: bool) -> bool:
        """Whether the logprob entries cover every generated token, so positions line up.

        llama-server gives no entry for a token that ends inside a UTF-8 character, nor (when
        streaming) for a final end-of-generation token; a response with such a gap cannot be
        replayed position by position and is dropped from scoring, never guessed at.
        """
        n, expected = len(self.token_ids), self.generated
        if expected is None or n == 0 or self.malformed:
            return False
        return n == expected or (streamed and self.finish_reason == "stop" and n == expected - 1)

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Record entries; a malformed one (an upstream that gives no token ids, say) marks the
        report unscorable instead of raising: the client's response must not depend on it."""
        if self.malformed:
            return
        try:
            for e in entries:
                tops = e.get("top_logprobs") or []
                row = (int(e["id"]), float(e["logprob"]), [int(t["id"]) for t in tops])
                top_lps = [float(t["logprob"]) for t in tops]
                self.token_ids.append(row[0])
                self.token_logprobs.append(row[1])
                self.top_ids.append(row[2])
                self.top_logprobs.append(top_lps)
        except (KeyError, TypeError, ValueError, AttributeError):
            self.malformed = True


@dataclass(frozen=True)
class ShadowJob:
    """What a scorer needs to replay one response. Dropped as soon as it is scored.

    Embedded primaries know their token ids; an HTTP primary's job carries the request's messages or
    prompt (``source``, tokenized by the primary itself when the job is scored, off the request
    path) and what the primary reported for each generated position (``report``).
    """

    prompt_tokens: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()  # every token the primary produced, end-of-generation included
    source: dict[str, Any] | None = None
    report: PrimaryReport | None = None  # what an HTTP primary reported per generated position
    ended_at: float = field(default_factory=time.monotonic)  # when the client's response ended
    keep: KeptScores | None = None  # the opted-in request's slot for its per-position numbers
    request_id: str | None = None  # the client's request (its x-request-id; kvproxy.http.request_id)
    turn: str = "text"  # one of TURNS: whether the answer held tool calls (their tokens are scored)
    # an embedded primary's served rows (kvproxy.backends.row_capture.RowCapture), when captured:
    # the scorer then decodes only the reference
    captured: Any = None


class Scorer(Protocol):
    async def score(self, job: ShadowJob) -> PositionScores: ...


class BatchScorer(Scorer, Protocol):
    """A scorer that can take several queued jobs in one call (up to ``max_jobs``, read per call):
    one result per job, in order, a job's own failure in its place."""

    @property
    def max_jobs(self) -> int: ...

    async def score_many(self, jobs: Sequence[ShadowJob]) -> Sequence[PositionScores | Exception]: ...
