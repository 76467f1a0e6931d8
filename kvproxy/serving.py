"""Serving logic between the thin routes and a backend: OpenAI requests in, OpenAI responses out.

Here a validated request becomes prompt tokens and a token budget (checked against the context
size), the backend's event stream becomes either one response object or a stream of SSE chunks.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from kvproxy import __version__
from kvproxy.backends.base import (
    Backend,
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from kvproxy.chat_template import ChatTemplateError
from kvproxy.deployment import EmbeddedDeployment
from kvproxy.errors import (
    OpenAIError,
    context_length_exceeded,
    model_load_failed,
    model_loading,
    pydantic_error,
)
from kvproxy.metrics import TokenClock
from kvproxy.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FinishReason,
    Usage,
)
from kvproxy.protocol import TokenLogprob as WireTokenLogprob
from kvproxy.protocol import TopLogprob as WireTopLogprob
from kvproxy.shadow import SHADOW_HEADER, ShadowDirective, ShadowJob, ShadowTicket, parse_shadow_header

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, object], *, exclude: set[str] | None = None) -> bytes:
    """One server-sent event carrying a JSON payload."""
    body = payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + body.encode() + b"\n\n"


def _wire_logprob(lp: TokenLogprob) -> WireTokenLogprob:
    return WireTokenLogprob(
        token=lp.token.decode("utf-8", errors="replace"),
        logprob=lp.logprob,
        bytes=list(lp.token),
        top_logprobs=[
            WireTopLogprob(
                token=t.token.decode("utf-8", errors="replace"), logprob=t.logprob, bytes=list(t.token)
            )
            for t in lp.top
        ],
    )


def _usage(done: Finished) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
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


@dataclass
class _Collected:
    text: str
    logprobs: list[TokenLogprob]
    done: Finished


async def _collect(events: AsyncGenerator[GenerationEvent, None]) -> _Collected:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                return _Collected("".join(parts), logprobs, event)
    raise BackendError("the backend ended without finishing the generation")


async def _prepend(
    first: GenerationEvent, rest: AsyncGenerator[GenerationEvent, None]
) -> AsyncGenerator[GenerationEvent, None]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()


def _backend_failure(exc: BackendError) -> OpenAIError:
    return OpenAIError(500, f"The backend failed: {exc}", type="server_error", code="backend_error")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_M = TypeVar("_M", bound=BaseModel)


def _strict(model: type[_M], body: dict[str, Any]) -> _M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise pydantic_error(exc) from exc


def _json_response(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


def shadow_directive(header: str | None) -> ShadowDirective | None:
    """The ``X-KVProxy-Shadow`` request header, or a 400 naming it."""
    try:
        return parse_shadow_header(header)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=SHADOW_HEADER) from exc


class OpenAIServing:
    """Chat completions, completions and the model list for one deployment."""

    def __init__(self, deployment: EmbeddedDeployment) -> None:
        self.deployment = deployment
        self.backend: Backend = deployment.backend
        self.load_error: str | None = None  # set when the backend failed to load
        self.fingerprint = f"kvproxy-{__version__}-{deployment.backend.kv}"

    def _ticket(self, directive: ShadowDirective | None) -> ShadowTicket | None:
        return self.deployment.ticket(directive)

    # ---- the router's interface: a JSON body in, an HTTP response out -----------------------

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None) -> Response:
        req = _strict(ChatCompletionRequest, body)
        if req.stream:
            chunks = await self.chat_stream(req, shadow)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        return _json_response(await self.chat(req, shadow))

    async def handle_completion(
        self, raw: bytes, body: dict[str, Any], shadow: ShadowDirective | None
    ) -> Response:
        req = _strict(CompletionRequest, body)
        if req.stream:
            chunks = await self.completion_stream(req, shadow)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        return _json_response(await self.completion(req, shadow))

    async def _events(
        self, gen: GenerationRequest, ticket: ShadowTicket | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The backend's events; a finished generation hands its tokens to the shadow path.

        The hand-over is a non-blocking queue put: the client's response never waits on scoring.
        """
        clock = TokenClock(self.deployment.serving_metrics)
        try:
            async for event in self.backend.generate(gen):
                if isinstance(event, Finished):
                    if ticket is not None:
                        ticket.submit(
                            ShadowJob(prompt_tokens=tuple(gen.prompt_tokens), token_ids=event.token_ids)
                        )
                    if clock.observer is not None:
                        clock.observer.tokens(event.prompt_tokens, event.completion_tokens)
                elif event.text:
                    clock.tick()
                yield event
        finally:
            if ticket is not None:
                ticket.abandon()  # a no-op once submitted

    def _check(self, model: str) -> None:
        if self.load_error is not None:
            raise model_load_failed(self.load_error)
        if not self.backend.ready:
            raise model_loading()

    async def _collected(self, gen: GenerationRequest, shadow: ShadowDirective | None) -> _Collected:
        try:
            return await _collect(self._events(gen, self._ticket(shadow)))
        except BackendError as exc:
            raise _backend_failure(exc) from exc

    async def _started(
        self, gen: GenerationRequest, shadow: ShadowDirective | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Start generating and wait for the first event, before any byte of a stream is sent.

        A request that fails at once (backend error) then still gets a proper HTTP status instead of
        a 200 stream carrying an error. Returns the events, the first one included.
        """
        events = self._events(gen, self._ticket(shadow))
        try:
            first = await anext(events)
        except BackendError as exc:
            await events.aclose()
            raise _backend_failure(exc) from exc
        return _prepend(first, events)

    def _budget(self, prompt: Sequence[int], requested: int | None) -> int:
        n_ctx = self.backend.n_ctx
        if len(prompt) >= n_ctx or (requested is not None and len(prompt) + requested > n_ctx):
            raise context_length_exceeded(n_ctx, len(prompt), requested)
        return requested if requested is not None else n_ctx - len(prompt)

    # ---- /v1/chat/completions ---------------------------------------------------------------

    def prepare_chat(self, req: ChatCompletionRequest) -> GenerationRequest:
        self._check(req.model)
        try:
            prompt_text = self.backend.render_chat([m.template_dict() for m in req.messages])
        except ChatTemplateError as exc:
            raise OpenAIError(400, str(exc), param="messages") from exc
        prompt = self.backend.tokenize(prompt_text, add_bos=True)
        return GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=self._budget(prompt, req.completion_limit),
            sampling=_sampling(req),
            stop=req.stop_sequences(),
            top_logprobs=req.top_logprobs_count,
        )

    async def chat(self, req: ChatCompletionRequest, shadow: ShadowDirective | None = None) -> ChatCompletion:
        got = await self._collected(self.prepare_chat(req), shadow)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=got.text),
                    logprobs=ChoiceLogprobs(content=[_wire_logprob(lp) for lp in got.logprobs])
                    if req.logprobs
                    else None,
                    finish_reason=got.done.finish_reason,
                )
            ],
            usage=_usage(got.done),
        )

    async def chat_stream(
        self, req: ChatCompletionRequest, shadow: ShadowDirective | None = None
    ) -> AsyncIterator[bytes]:
        return self._chat_chunks(req, await self._started(self.prepare_chat(req), shadow))

    async def _chat_chunks(
        self, req: ChatCompletionRequest, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncIterator[bytes]:
        chunk = ChatCompletionChunk(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
        )

        def delta(event: TextDelta) -> ChatCompletionChunk:
            lp = ChoiceLogprobs(content=[_wire_logprob(x) for x in event.logprobs]) if req.logprobs else None
            chunk.choices = [ChatChunkChoice(delta=ChatDelta(content=event.text), logprobs=lp)]
            return chunk

        def finish(done: Finished) -> ChatCompletionChunk:
            chunk.choices = [ChatChunkChoice(delta=ChatDelta(), finish_reason=done.finish_reason)]
            return chunk

        def usage(done: Finished) -> ChatCompletionChunk:
            chunk.choices = []
            chunk.usage = _usage(done)
            return chunk

        yield sse(chunk, exclude={"usage"})
        async for out in _sse_stream(events, delta, finish, usage if req.include_usage else None):
            yield out

    # ---- /v1/completions --------------------------------------------------------------------

    def prepare_completion(self, req: CompletionRequest) -> GenerationRequest:
        self._check(req.model)
        if isinstance(req.prompt, str):
            prompt = self.backend.tokenize(req.prompt, add_bos=True)
        elif isinstance(req.prompt[0], str):
            prompt = self.backend.tokenize(str(req.prompt[0]), add_bos=True)
        else:
            prompt = [int(t) for t in req.prompt]
            n_vocab = self.backend.n_vocab
            if any(t >= n_vocab for t in prompt):
                raise OpenAIError(
                    400,
                    f"Invalid value for 'prompt': token ids must be below the vocabulary size {n_vocab}.",
                    param="prompt",
                )
        if not prompt:
            raise OpenAIError(400, "The prompt is empty.", param="prompt")
        return GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=self._budget(prompt, req.max_tokens),
            sampling=_sampling(req),
            stop=req.stop_sequences(),
            top_logprobs=req.logprobs,
        )

    def _completion(
        self, text: str, finish: FinishReason | None, logprobs: CompletionLogprobs | None
    ) -> Completion:
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],
        )

    @staticmethod
    def _legacy_logprobs(entries: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens = [lp.token.decode("utf-8", errors="replace") for lp in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in entries],
            top_logprobs=[
                {t.token.decode("utf-8", errors="replace"): t.logprob for t in lp.top} for lp in entries
            ],
            text_offset=offsets,
        )

    async def completion(self, req: CompletionRequest, shadow: ShadowDirective | None = None) -> Completion:
        got = await self._collected(self.prepare_completion(req), shadow)
        lp = self._legacy_logprobs(got.logprobs, 0) if req.logprobs is not None else None
        out = self._completion(got.text, got.done.finish_reason, lp)
        out.usage = _usage(got.done)
        return out

    async def completion_stream(
        self, req: CompletionRequest, shadow: ShadowDirective | None = None
    ) -> AsyncIterator[bytes]:
        return self._completion_chunks(req, await self._started(self.prepare_completion(req), shadow))

    async def _completion_chunks(
        self, req: CompletionRequest, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncIterator[bytes]:
        offset = 0

        def delta(event: TextDelta) -> Completion:
            nonlocal offset
            lp = self._legacy_logprobs(event.logprobs, offset) if req.logprobs is not None else None
            offset += len(event.text)
            return self._completion(event.text, None, lp)

        def usage(done: Finished) -> Completion:
            final = self._completion("", None, None)
            final.choices = []
            final.usage = _usage(done)
            return final

        def finish(done: Finished) -> Completion:
            return self._completion("", done.finish_reason, None)

        async for out in _sse_stream(events, delta, finish, usage if req.include_usage else None):
            yield out


async def _sse_stream(
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
                yield sse(delta(event), exclude={"usage"})
                continue
            yield sse(finish(event), exclude={"usage"})
            if usage is not None:
                yield sse(usage(event))
            yield SSE_DONE
            return
    except BackendError as exc:
        yield sse(_backend_failure(exc).body())
    finally:
        await events.aclose()
