"""Live what-if statistics of one deployment: per KV config, on the same sampled jobs.

Three kinds of config share a job's tokens: the served one (its scores are the shadow scorer's own
for that job), each candidate (the what-if replay) and the reference (KLD 0 by definition, drawn so
that the frontier and the budget pick always have a fallback). Each scored config keeps a
:class:`~kvproxy.shadow.quality.QualityTracker` (llama-perplexity's statistics since start, bounded
memory). KV bytes per token and at the deployment's context come from kvproxy.model.memory.

The frontier and the budget pick follow ``kvproxy calibrate``'s rules (kvproxy.calibrate.pareto_front,
recommend) on the live figures; a config not scored yet (mean NaN) is neither on it nor picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.kld import PositionScores
from kvproxy.shadow.quality import QualityTracker


@dataclass(frozen=True)
class Point:
    config: str
    kv_bytes: int
    mean_kld: float


def pareto(points: Sequence[Point]) -> set[str]:
    """The configs no other scored config beats on both KV bytes and mean KLD."""
    scored = [p for p in points if not math.isnan(p.mean_kld)]
    return {
        p.config
        for p in scored
        if not any(
            o is not p
            and o.kv_bytes <= p.kv_bytes
            and o.mean_kld <= p.mean_kld
            and (o.kv_bytes < p.kv_bytes or o.mean_kld < p.mean_kld)
            for o in scored
        )
    }


def cheapest_within(points: Sequence[Point], budget: float) -> str | None:
    """The config with the fewest KV bytes whose mean KLD is at most ``budget`` (ties: lower KLD)."""
    fitting = [p for p in points if not math.isnan(p.mean_kld) and p.mean_kld <= budget]
    return min(fitting, key=lambda p: (p.kv_bytes, p.mean_kld)).config if fitting else None


ROLES = ("served", "candidate", "reference")
OUTCOMES = ("scored", "failed", "shed", "not_sampled")


@dataclass(frozen=True)
class ConfigCost:
    """A KV config as the what-if shows it: its label (the operator's spelling, a metrics label
    value), its role and what its KV cache costs."""

    kv: KVConfig
    role: str
    bytes_per_token: int
    allocated_bytes: int  # at the deployment's context (every slot's stream)

    @property
    def label(self) -> str:
        return str(self.kv)


@dataclass
class WhatIfCounts:
    """Jobs offered to the what-if, by outcome (:data:`OUTCOMES`): ``scored`` replayed under every
    candidate, ``failed``, ``shed`` (sampled while scoring had a backlog: the what-if gave way),
    ``not_sampled`` (outside ``--what-if-rate``)."""

    by_outcome: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    scored_tokens: int = 0


class WhatIfTracker:
    def __init__(
        self,
        served: ConfigCost,
        candidates: list[ConfigCost],
        reference: ConfigCost,
        *,
        budget: float,
        rate: float,
        n_ctx: int,
        score_path: str = "decode",
        window: int = 4096,
    ) -> None:
        self.served = served
        self.candidates = candidates
        self.reference = reference
        self.budget = budget
        self.rate = rate
        self.n_ctx = n_ctx
        self.score_path = score_path
        self.counts = WhatIfCounts()
        self.trackers = {c.label: QualityTracker(window=window) for c in [served, *candidates]}
        self._status: dict[str, Any] | None = None  # read by every scrape's gauges: kept until a change

    @property
    def configs(self) -> list[ConfigCost]:
        return [self.served, *self.candidates, self.reference]

    def count(self, outcome: str) -> None:
        self.counts.by_outcome[outcome] += 1
        self._status = None

    def add(self, served: PositionScores, candidates: list[PositionScores]) -> None:
        """One job's scores: the served config's (the shadow scorer's) and each candidate's."""
        if len(candidates) != len(self.candidates):
            raise ValueError(f"{len(candidates)} candidate results for {len(self.candidates)} candidates")
        self.trackers[self.served.label].add(served)
        for c, s in zip(self.candidates, candidates, strict=True):
            self.trackers[c.label].add(s)
        self.counts.scored_tokens += len(served)
        self.count("scored")

    def mean_kld(self, c: ConfigCost) -> float:
        if c.role == "reference":
            return 0.0 if self.counts.scored_tokens else math.nan
        return self.trackers[c.label].since_start().mean

    def status(self) -> dict[str, Any]:
        """The what-if as the status route, the what-if route and the page show it."""
        if self._status is None:
            self._status = self._compute()
        return self._status

    def _compute(self) -> dict[str, Any]:
        points = [Point(c.label, c.allocated_bytes, self.mean_kld(c)) for c in self.configs]
        front = pareto(points)
        rows = []
        for c in self.configs:
            if c.role == "reference":
                s: dict[str, Any] = {"tokens": self.counts.scored_tokens, "mean": 0.0, "mean_error": 0.0}
                s |= {"same_top": 1.0, "same_top_error": 0.0} if self.counts.scored_tokens else {}
            else:
                s = self.trackers[c.label].since_start().as_dict()
            rows.append(
                {
                    "config": c.label,
                    **c.kv.as_dict(),
                    "role": c.role,
                    "bytes_per_token": c.bytes_per_token,
                    "allocated_bytes": c.allocated_bytes,
                    "pareto": c.label in front,
                    "kld": s,
                }
            )
        counts = self.counts
        return {
            "rate": self.rate,
            "kld_budget": self.budget,
            "within_budget": cheapest_within(points, self.budget),
            "served": self.served.label,
            "reference": self.reference.label,
            "score_path": self.score_path,
            "n_ctx": self.n_ctx,
            "jobs": dict(counts.by_outcome),
            "scored_tokens": counts.scored_tokens,
            "configs": rows,
        }
