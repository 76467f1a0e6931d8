"""One opted-in response's per-position scores (KLD, same-top: numbers only, never text), filled in
by its shadow job and read back by ``GET /kvproxy/v1/scores/{id}`` (kvproxy.shadow.token_scores keeps
the slots)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvproxy.kld import PositionScores

PENDING, SCORED, FAILED, DROPPED, NOT_SAMPLED = "pending", "scored", "failed", "dropped", "not_sampled"


@dataclass
class KeptScores:
    """One opted-in response: ``pending`` until its shadow job scored, failed or was dropped."""

    created: float = field(default_factory=time.monotonic)
    state: str = PENDING
    claimed: bool = False
    first_position: int | None = None
    kld: list[float] = field(default_factory=list)
    same_top: list[bool] = field(default_factory=list)
    request_id: str | None = None  # the x-request-id of the response's request

    def scored(self, scores: PositionScores) -> None:
        if self.state == PENDING:
            self.state = SCORED
            self.first_position = scores.first_position
            self.kld = [float(x) for x in scores.kld]
            self.same_top = [bool(x) for x in scores.same_top]

    def end(self, state: str) -> None:
        """A final state without scores (failed, dropped, not sampled); the first one stands."""
        if self.state == PENDING:
            self.state = state

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.state}
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.state == SCORED:
            out.update(
                positions=len(self.kld),
                first_position=self.first_position,
                kld=self.kld,
                same_top=self.same_top,
            )
        return out
