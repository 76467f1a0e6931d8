"""The client side of a kvproxy scoring server (``kvproxy backend``): one request per shadow job.

The scoring server holds the deployment's primary KV config and the reference's on the same weights
and returns exact per-position scores (one prefill per config instead of one request per token). It
also returns, for every position, its own primary-config logprobs of the tokens the live primary
reported in its top K: how far the two disagree says whether the scoring replica really behaves
like the primary (a mismatch, such as a different KV type, is itself worth an alert).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.kld import PositionScores, coarse_kld_row
from kvproxy.scoring.contract import INFO_PATH, SCORE_PATH, PromptFillSpec, ScoreAnswer, ScoreBody, ScoreInfo
from kvproxy.scoring.job import PrimaryReport
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.upstream.replicas import (
    ReplicaPool,
    UpstreamError,
    UpstreamFailure,
    map_transport_error,
    map_upstream_status,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreServerInfo:
    model: str
    primary_kv: KVConfig
    reference_kv: KVConfig
    score_path: str = "prefill"  # a server from before score paths replayed in chunks
    n_ubatch: int | None = None  # its contexts' micro-batch (None: a server from before issue 27)
    # what its model keeps of a prompt ("swa", "recurrent", "full"; None: a server from before the
    # cached-prefix replay): how a llama-server primary's cached prefixes can be replayed
    memory: str | None = None


async def probe_score_route(pool: ReplicaPool) -> ScoreServerInfo | None:
    """A kvproxy scoring server answers ``GET /kvproxy/v1/info``; a plain llama-server says 404.

    A scoring server still loading its model says ``"score": false``: that is not an answer yet, so
    it raises (the job fails and the next one asks again) rather than settling on top-K scoring."""
    async with pool.acquire() as replica:
        status, content = await replica.get(INFO_PATH)
    if status != 200:
        return None
    info = ScoreInfo.model_validate_json(content)
    if not info.score:
        raise UpstreamFailure(503, f"the scoring server {replica.url} is still loading", code="model_loading")
    return ScoreServerInfo(
        info.model,
        info.primary.config(),
        info.reference.config(),
        info.score_path,
        info.n_ubatch,
        info.memory,
    )


def ubatch_mismatch(info: ScoreServerInfo, fill: PromptFill | None) -> bool:
    """A decode-path replay of a llama-server primary by a scoring server with another micro-batch
    (measured: f16 rows 1.2e-3 nats apart with -ub 16 against 512; 1.5e-6 with the same)."""
    return (
        fill is not None
        and info.score_path == "decode"
        and info.n_ubatch is not None
        and info.n_ubatch != min(fill.ubatch, fill.batch)
    )


class ScoreRouteReference:
    def __init__(
        self, pool: ReplicaPool, info: ScoreServerInfo, *, prompt_fill: PromptFill | None = None
    ) -> None:
        self.pool = pool
        self.info = info
        self.prompt_fill = prompt_fill
        self._kl_sum = 0.0
        self._positions = 0
        if ubatch_mismatch(info, prompt_fill):
            log.warning(
                "the scoring server %s computes with micro-batches of %s tokens, the primary with %s: "
                "its sliding-window cache then has another size and its replay other rows than the "
                "primary served (start it with --batch-size %s)",
                pool.replicas[0].url if pool.replicas else "?",
                info.n_ubatch,
                prompt_fill.ubatch if prompt_fill else "?",
                prompt_fill.ubatch if prompt_fill else "?",
            )

    @property
    def replays_prompt_cuts(self) -> bool:
        """Whether this replay cuts the prompt as the primary llama-server did (the decode path,
        given how the primary was started): then the primary's user-message starts matter."""
        return self.prompt_fill is not None and self.info.score_path == "decode"

    def consistency(self) -> dict[str, Any]:
        """Mean coarse KL between the live primary's top-K and the scoring replica's logprobs of the
        same tokens: near 0 when the replica really behaves like the primary, larger when its KV
        config (or the numerics it computes with) differ (docs/production.md has the figures)."""
        n = self._positions
        return {
            "scorer_primary": self.info.primary_kv.as_dict(),
            "score_path": self.info.score_path,
            "compared_positions": n,
            "mean_divergence": (self._kl_sum / n) if n else None,
        }

    @property
    def replays_cached_prefixes(self) -> bool:
        """Whether a prompt that started from a cached prefix can be replayed as the primary computed
        it (kvproxy.scoring.cached_prefix models a sliding-window model's checkpoint restore): the
        scoring server says its model is one, and takes explicit calls."""
        return self.replays_prompt_cuts and self.info.memory == "swa"

    async def score(
        self,
        prompt: list[int],
        report: PrimaryReport,
        *,
        user_starts: Sequence[int] = (),
        calls: Sequence[tuple[int, int]] | None = None,
    ) -> PositionScores:
        """``user_starts``: where the primary (llama-server, Jinja templates) saw user messages start
        in ``prompt``; it cut its prompt batches there, so the replay does too. ``calls``: the
        primary's calls for ``prompt`` when it started from a cached prefix (else the scoring server
        derives them for an empty slot)."""
        fill = self.prompt_fill if self.replays_prompt_cuts else None
        if fill is not None:
            fill = fill.for_prompt(user_starts)
            fill = fill.with_calls(calls) if calls is not None else fill
        body = ScoreBody(
            prompt_tokens=prompt,
            token_ids=report.token_ids,
            # the primary's top K, where it reported them (its logprobs)
            check_ids=report.top_ids or None,
            prompt_fill=PromptFillSpec.of(fill) if fill is not None else None,
        )
        async with self.pool.acquire() as replica:
            try:
                payload = body.model_dump_json(exclude_none=True).encode()
                status, content = await replica.post(SCORE_PATH, payload)
            except UpstreamError as exc:
                raise map_transport_error(replica, exc) from exc
            if status != 200:
                raise map_upstream_status(replica, status, content)
        data = ScoreAnswer.model_validate_json(content)
        n = len(report.token_ids)
        sizes = {key: len(getattr(data, key)) for key in ("kld", "same_top", "p_ref", "p_primary")}
        if any(size != n for size in sizes.values()):  # never record scores for the wrong positions
            raise ValueError(f"the scoring server answered {sizes} positions for {n} tokens")
        checks = data.check_logprobs or []
        served = np.full(n, np.nan)
        for j, (ids, reported, replayed) in enumerate(
            zip(report.top_ids, report.top_logprobs, checks, strict=False)
        ):
            if reported and replayed:
                served[j] = coarse_kld_row(ids, reported, ids, replayed)
                self._kl_sum += served[j]
                self._positions += 1
        return PositionScores(
            np.asarray(data.kld, dtype=np.float64),
            np.asarray(data.same_top, dtype=bool),
            np.asarray(data.p_ref, dtype=np.float64),
            np.asarray(data.p_primary, dtype=np.float64),
            first_position=len(prompt),
            served_divergence=served,
        )
