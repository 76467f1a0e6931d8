"""The scoring server's contract (``kvproxy backend``): one set of models for the route and its client.

``GET /kvproxy/v1/info`` answers :class:`ScoreInfo`; ``POST /kvproxy/v1/score`` takes a
:class:`ScoreBody` and answers :class:`ScoreAnswer`. The route (kvproxy.api.score) validates with
them and the client (kvproxy.scoring.score_client) builds and reads with them, so a field is named
once. Requests are strict (an unknown field is a 400); answers are read leniently (fields a newer
server adds are ignored, fields an older one lacks take their defaults).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType
from kvproxy.scoring.prompt_fill import PromptFill

INFO_PATH = "/kvproxy/v1/info"
SCORE_PATH = "/kvproxy/v1/score"

TokenId = Annotated[int, Field(ge=0)]


class PromptFillSpec(BaseModel):
    """How the live primary (a llama-server) cut the prompt into calls (kvproxy.scoring.prompt_fill)."""

    model_config = ConfigDict(extra="forbid")
    batch: Annotated[int, Field(ge=1)] = 2048
    ubatch: Annotated[int, Field(ge=1)] = 512
    checkpoints: bool = True
    checkpoint_min_step: Annotated[int, Field(ge=0)] = 8192
    # where the primary saw user messages start in this prompt (llama-server with Jinja templates
    # cuts there; kvproxy.model.message_spans): token positions inside the prompt
    user_starts: list[TokenId] = []
    # the primary's llama_decode calls for this prompt, [start, end) in order from 0, when the proxy
    # knows them: a prompt that started from a cached prefix (kvproxy.scoring.cached_prefix); else
    # the scorer derives them from the rest, for a slot with nothing cached
    calls: list[tuple[TokenId, TokenId]] | None = None

    @classmethod
    def of(cls, fill: PromptFill) -> PromptFillSpec:
        return cls(
            batch=fill.batch,
            ubatch=fill.ubatch,
            checkpoints=fill.checkpoints,
            checkpoint_min_step=fill.checkpoint_min_step,
            user_starts=list(fill.user_starts),
            calls=list(fill.given) if fill.given is not None else None,
        )

    def fill(self) -> PromptFill:
        """The fill; a ValueError for calls that do not cover a prompt in order."""
        fill = PromptFill(
            batch=self.batch,
            ubatch=self.ubatch,
            checkpoints=self.checkpoints,
            checkpoint_min_step=self.checkpoint_min_step,
        ).for_prompt(self.user_starts)
        return fill.with_calls(self.calls) if self.calls is not None else fill


class ScoreBody(BaseModel):
    """One job: position j scores ``token_ids[j]`` given ``prompt_tokens + token_ids[:j]``."""

    model_config = ConfigDict(extra="forbid")
    prompt_tokens: Annotated[list[TokenId], Field(min_length=1)]
    token_ids: Annotated[list[TokenId], Field(min_length=1)]
    # per position, the ids the live primary reported in its top K: the server answers its own
    # primary-config logprobs of them (how far the scoring replica is from the primary)
    check_ids: list[list[TokenId]] | None = None
    # how the live primary (a llama-server) cut the prompt into calls: the decode-path replay cuts it
    # the same way, so its rows are the served ones (kvproxy.scoring.prompt_fill)
    prompt_fill: PromptFillSpec | None = None


class KVSpec(BaseModel):
    """A KV config as the info route spells it (``KVConfig.as_dict``)."""

    cache_type_k: KVCacheType
    cache_type_v: KVCacheType

    @classmethod
    def of(cls, kv: KVConfig) -> KVSpec:
        return cls(cache_type_k=kv.cache_type_k, cache_type_v=kv.cache_type_v)

    def config(self) -> KVConfig:
        return KVConfig(self.cache_type_k, self.cache_type_v)


class ScoreInfo(BaseModel):
    """What a scoring server scores with. ``score`` is false while its model loads."""

    model: str
    score: bool = False
    primary: KVSpec
    reference: KVSpec
    n_ctx: int | None = None
    # its contexts' micro-batch: it sizes the sliding-window cache, so a replay matches a primary's
    # rows only with the primary's (-ub), as it does only with its thread count on a CPU (None: a
    # server from before issue 27)
    n_ubatch: int | None = None
    score_path: str = "prefill"  # a server from before score paths replayed in chunks
    device: str | None = None
    # what its model keeps of a prompt (kvproxy.scoring.contexts.memory_kind: "swa", "recurrent",
    # "full"): how a llama-server primary reuses a cached prefix depends on it (None: a server from
    # before the cached-prefix replay, which takes no explicit calls)
    memory: str | None = None


class ScoreAnswer(BaseModel):
    """Per-position numbers only: no vocabulary-wide row ever crosses HTTP."""

    estimator: str = "exact"
    kld: list[float]
    same_top: list[bool]
    p_ref: list[float]
    p_primary: list[float]
    check_logprobs: list[list[float]] | None = None
