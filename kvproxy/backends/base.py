"""The small interface every backend kind offers the serving layer.

A backend turns prompt token ids into a stream of :class:`TextDelta` events ending in one
:class:`Finished`. Text arrives already cut at stop sequences and as whole UTF-8 characters, so the
serving layer only formats it. Logprobs are natural-log probabilities of the raw softmax (before
temperature, top-p, ...), as llama-server reports them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kvproxy.config import KVCacheType


class BackendError(Exception):
    """The backend failed while serving a request (not the client's fault)."""


class Overloaded(BackendError):
    """No capacity for this request now (a 503); ``retry_after``: seconds after which there likely is."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; otherwise alternatives per position
    # a llama.cpp grammar (GBNF) constraining the sampled tokens; logprobs stay those of the raw
    # distribution, before the grammar (as the shadow path, which replays without it, scores them)
    grammar: str | None = None
    # special tokens whose text is part of the output (llama-server's "preserved tokens": a
    # reasoning template's <think> or <|channel>, which kvproxy.model.reasoning then splits on)
    special_tokens: frozenset[int] = frozenset()
    # the served row of every sampled token is copied here (a shadow-sampled request in embedded
    # mode: kvproxy.backends.row_capture.RowCapture), so scoring need not replay the primary
    capture: Any = None


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: bytes
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Logprobs of the tokens whose text this delta completes (a held-back token shows up later).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    # Every token the model produced, including a final end-of-generation token (which the
    # completion's text and completion_tokens leave out): what a shadow scorer must replay.
    token_ids: tuple[int, ...] = ()


GenerationEvent = TextDelta | Finished


@dataclass(frozen=True)
class KVConfig:
    cache_type_k: KVCacheType
    cache_type_v: KVCacheType

    def __str__(self) -> str:
        k, v = self.cache_type_k.value, self.cache_type_v.value
        return k if k == v else f"{k}/{v}"

    def as_dict(self) -> dict[str, str]:
        """As the status, the scoring server's info and the page spell a KV config."""
        return {"cache_type_k": self.cache_type_k.value, "cache_type_v": self.cache_type_v.value}


class Backend(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def model_name(self) -> str: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]: ...

    async def json_grammar(self, schema: dict[str, Any] | None) -> str: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]: ...
