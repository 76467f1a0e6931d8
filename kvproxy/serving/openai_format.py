"""Backend events as OpenAI objects: logprobs, usage, sampling parameters, the SSE body.

Pure conversions between :mod:`kvproxy.backends.base` and :mod:`kvproxy.protocol`, shared by the
chat and completion routes of the embedded serving.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from kvproxy import sse
from kvproxy.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    Overloaded,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from kvproxy.errors import OpenAIError, server_busy
from kvproxy.protocol import ChatCompletionRequest, CompletionLogprobs, CompletionRequest, Usage
from kvproxy.protocol import TokenLogprob as WireTokenLogprob
from kvproxy.protocol import TopLogprob as WireTopLogprob
from kvproxy.protocol_responses import ResponsesLogprob, ResponsesRequest, ResponsesTopLogprob

_Entry = TypeVar("_Entry", bound=BaseModel)


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _logprob_entry(lp: TokenLogprob, entry: Callable[..., _Entry], top: Callable[..., object]) -> _Entry:
    """One position's logprob in a wire model: its token, and its alternatives in another."""
    alternatives = [top(token=_text(t.token), logprob=t.logprob, bytes=list(t.token)) for t in lp.top]
    return entry(token=_text(lp.token), logprob=lp.logprob, bytes=list(lp.token), top_logprobs=alternatives)


def wire_logprob(lp: TokenLogprob) -> WireTokenLogprob:
    return _logprob_entry(lp, WireTokenLogprob, WireTopLogprob)


def responses_logprob(lp: TokenLogprob) -> ResponsesLogprob:
    """The Responses API's logprob entry (as chat's, without token ids)."""
    return _logprob_entry(lp, ResponsesLogprob, ResponsesTopLogprob)


def legacy_logprobs(entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The ``/v1/completions`` logprobs shape; ``offset``: the text's length before these tokens."""
    tokens = [_text(lp.token) for lp in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in entries],
        top_logprobs=[{_text(t.token): t.logprob for t in lp.top} for lp in entries],
        text_offset=offsets,
    )


def usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def sampling(req: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=req.temperature if req.temperature is not None else defaults.temperature,
        top_p=req.top_p if req.top_p is not None else defaults.top_p,
        top_k=req.top_k if req.top_k is not None else defaults.top_k,
        min_p=req.min_p if req.min_p is not None else defaults.min_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        repeat_penalty=req.repeat_penalty if req.repeat_penalty is not None else 1.0,
        seed=req.seed,
    )


def backend_failure(exc: BackendError) -> OpenAIError:
    if isinstance(exc, Overloaded):  # no slot now (queue full, or waited too long): retry later
        return server_busy(str(exc), exc.retry_after)
    return OpenAIError(500, f"The backend failed: {exc}", type="server_error", code="backend_error")


@dataclass
class Collected:
    text: str
    logprobs: list[TokenLogprob]
    done: Finished


async def collect(events: AsyncGenerator[GenerationEvent, None]) -> Collected:
    """A whole generation, for a response that is not streamed."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                return Collected("".join(parts), logprobs, event)
    raise BackendError("the backend ended without finishing the generation")


async def prepend(
    first: GenerationEvent, rest: AsyncGenerator[GenerationEvent, None]
) -> AsyncGenerator[GenerationEvent, None]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()


async def sse_stream(
    events: AsyncGenerator[GenerationEvent, None],
    delta: Callable[[TextDelta], BaseModel],
    finish: Callable[[Finished], BaseModel],
    usage: Callable[[Finished], BaseModel] | None,
) -> AsyncIterator[bytes]:
    """The SSE body shared by both routes: a chunk per delta, the finish chunk, the usage chunk if
    asked for, ``[DONE]``; a backend failure mid-stream becomes an error event."""
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield sse.encode(delta(event), exclude={"usage"})
                continue
            yield sse.encode(finish(event), exclude={"usage"})
            if usage is not None:
                yield sse.encode(usage(event))
            yield sse.DONE
            return
    except BackendError as exc:
        yield sse.encode(backend_failure(exc).body())
    finally:
        await events.aclose()
