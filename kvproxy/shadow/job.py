"""What one shadow job carries: the tokens to replay and, for an HTTP primary, what it reported.

A job is dropped as soon as it is scored: it holds the prompt and the completion.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvproxy.kld import PositionScores
from kvproxy.shadow.token_scores import KeptScores


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

    def note_end(self, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        if isinstance(usage, dict) and "completion_tokens" in usage:
            self.completion_tokens = int(usage["completion_tokens"])
        for choice in data.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def aligned(self, *, streamed: bool) -> bool:
        """Whether the logprob entries cover every generated token, so positions line up.

        llama-server gives no entry for a token that ends inside a UTF-8 character, nor (when
        streaming) for a final end-of-generation token; a response with such a gap cannot be
        replayed position by position and is dropped from scoring, never guessed at.
        """
        n, expected = len(self.token_ids), self.completion_tokens
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


class Scorer(Protocol):
    async def score(self, job: ShadowJob) -> PositionScores: ...


class BatchScorer(Scorer, Protocol):
    """A scorer that can take several queued jobs in one call (up to ``max_jobs``, read per call):
    one result per job, in order, a job's own failure in its place."""

    @property
    def max_jobs(self) -> int: ...

    async def score_many(self, jobs: Sequence[ShadowJob]) -> Sequence[PositionScores | Exception]: ...
