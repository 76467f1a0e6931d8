"""The what-if's Pareto frontier and budget pick: pure functions on (config, KV bytes, mean KLD).

The same rules as ``kvproxy calibrate`` (kvproxy.calibrate.pareto_front / recommend), on the live
figures: a config is on the frontier when no other is at least as small and at least as good and
better on one of the two; the pick is the smallest config whose mean KLD is within the budget.
Configs not scored yet (no tokens, mean NaN) are neither on the frontier nor picked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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
