"""Serving for the embedded backend: OpenAI requests in, OpenAI responses (or SSE chunks) out.

A validated request becomes prompt tokens and a token budget (checked against the context size):
the chat template is rendered and the prompt tokenized on a worker thread, never on the event loop,
and a prompt that cannot fit is refused from its length in bytes before it is tokenized at all.
The backend's events then become one response object or a stream of SSE chunks (chat completions,
completions; the Responses API is served as a chat completion, kvproxy.serving.responses_chat); a
finished generation hands its tokens to the shadow
path with a non-blocking put. A JSON response format becomes a llama.cpp grammar; the shadow path
replays the tokens without it, so their KLD is that of the raw distributions (docs/design.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from kvproxy import sse
from kvproxy.backends.base import BackendError, Finished, GenerationEvent, GenerationRequest, TextDelta
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.errors import OpenAIError, context_length_exceeded, model_load_failed, model_loading
from kvproxy.model.chat_template import ChatTemplate, ChatTemplateError, RenderedChat
from kvproxy.model.content_specials import mark_literals
from kvproxy.model.gemma_tools_template import with_tool_calls
from kvproxy.model.reasoning import ReasoningSplitter
from kvproxy.observers import TokenClock
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
    MessageToolCall,
    OutputFormat,
)
from kvproxy.protocol_responses import ResponsesRequest
from kvproxy.scoring.job import ShadowJob
from kvproxy.serving import responses_chat
from kvproxy.serving.base import SSE_HEADERS, SSE_MEDIA_TYPE, embedded_build, system_fingerprint, validated
from kvproxy.serving.openai_format import (
    Collected,
    backend_failure,
    collect,
    legacy_logprobs,
    prepend,
    sampling,
    sse_stream,
    usage,
    wire_logprob,
)
from kvproxy.serving.responses_chat import responses_param
from kvproxy.serving.responses_format import ResponsesRenderer, StreamBroke, render_stream
from kvproxy.serving.tool_turns import ToolTurn, finish_reason, split, tool_chunks
from kvproxy.shadow.ask import NO_ASK, ShadowAsk
from kvproxy.shadow.pool import ShadowTicket
from kvproxy.upstream.llama_server import strip_logprobs

log = logging.getLogger(__name__)


def _log_refused_schema(exc: ValueError) -> None:
    """One short line at the default level, naming only the bound the schema passed: the refusal's
    text quotes the schema and llama.cpp's words quote its grammar, so those are for debug only."""
    log.info("refused a response-format schema: %s", getattr(exc, "bound", "schema"))
    log.debug("refused schema: %.2000s %.1000s", exc, getattr(exc, "detail", ""))


def _json_response(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


def _streaming(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


class EmbeddedServing:
    """Chat completions and completions for one embedded deployment."""

    def __init__(self, deployment: EmbeddedDeployment, *, max_tokens_default: int = 0) -> None:
        self.deployment = deployment
        self.backend = deployment.backend
        self.fingerprint = system_fingerprint(embedded_build(), deployment.backend.kv)
        self.max_tokens_default = max_tokens_default  # for requests that set no limit; 0: the context
        settings = getattr(self.backend, "settings", None)  # a test's stub backend has none
        self.parse_special_in_content = bool(getattr(settings, "parse_special_in_content", False))

    # ---- the router's interface: a JSON body in, an HTTP response out -----------------------

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(ChatCompletionRequest, body)
        if req.stream:
            return _streaming(await self.chat_stream(req, shadow))
        return _json_response(await self.chat(req, shadow))

    async def handle_completion(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(CompletionRequest, body)
        if req.stream:
            return _streaming(await self.completion_stream(req, shadow))
        return _json_response(await self.completion(req, shadow))

    async def handle_responses(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(ResponsesRequest, body)
        messages = responses_chat.translatable(body)
        if messages is None:  # the model above refuses all such input first; kept as a guard
            raise OpenAIError(400, "This input cannot be served as a chat completion.", param="input")
        cap = responses_chat.output_cap(body, self.max_tokens_default)
        chat = responses_chat.chat_body(body, messages, 0)  # _budget applies the default
        renderer = ResponsesRenderer(req, self.backend.model_name, cap)
        wants = responses_chat.wants_logprobs(body)
        try:  # errors named as the Responses request has them (input, text.format.schema, ...)
            chat_req = validated(ChatCompletionRequest, chat)
            if req.stream:
                chunks = await self.chat_stream(chat_req, shadow)
                return _streaming(render_stream(renderer, _parsed(chunks, wants)))
            data = (await self.chat(chat_req, shadow)).model_dump(mode="json")
        except OpenAIError as exc:
            exc.detail.param = responses_param(exc.detail.param)
            raise
        for choice in data["choices"]:
            strip_logprobs(choice, *wants)
        return _json_response(renderer.from_chat(data))

    async def handle_other(self, path: str, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        raise OpenAIError(
            404,
            f"{path} is not served by the embedded backend: kvproxy serves generation only (chat "
            "completions, completions, responses). Put kvproxy in front of llama-server (kvproxy serve "
            "--primary URL) to have it relay this route.",
            code="unsupported_route",
        )

    # ---- generation and its hand-over to the shadow path ------------------------------------

    async def _events(
        self, gen: GenerationRequest, ticket: ShadowTicket | None, turn: ToolTurn | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The backend's events; a finished generation hands its tokens to the shadow path (a tool
        turn's call tokens are scored as any others; the job says whether the answer was a call)."""
        events = self.deployment.events
        clock = TokenClock(events)
        parts: list[str] = []
        if ticket is not None:  # a sampled request keeps its served rows: scoring decodes the reference only
            gen = dataclasses.replace(gen, capture=self.backend.new_capture())
        try:
            async for event in self.backend.generate(gen):
                if isinstance(event, Finished):
                    if ticket is not None:
                        called = turn is not None and bool(turn.parse("".join(parts))[1])
                        ticket.submit(
                            ShadowJob(
                                prompt_tokens=tuple(gen.prompt_tokens),
                                token_ids=event.token_ids,
                                turn="tool_call" if called else "text",
                                captured=gen.capture,
                            )
                        )
                    events.tokens(event.prompt_tokens, event.completion_tokens)
                    self.deployment.shadow.generated(len(event.token_ids))
                elif event.text:
                    clock.tick()
                    if turn is not None and turn.active:
                        parts.append(event.text)
                yield event
        finally:
            if ticket is not None:
                ticket.abandon()  # a no-op once submitted

    def _check_ready(self) -> None:
        if self.deployment.load_error is not None:
            raise model_load_failed(self.deployment.load_error)
        if not self.backend.ready:
            raise model_loading()

    async def _collected(
        self, gen: GenerationRequest, shadow: ShadowAsk, turn: ToolTurn | None = None
    ) -> Collected:
        try:
            return await collect(self._events(gen, self.deployment.ticket(shadow), turn))
        except BackendError as exc:
            raise backend_failure(exc) from exc

    async def _started(
        self, gen: GenerationRequest, shadow: ShadowAsk, turn: ToolTurn | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Start generating and wait for the first event, before any byte of a stream is sent.

        A request that fails at once (backend error) then still gets a proper HTTP status instead of
        a 200 stream carrying an error. Returns the events, the first one included.
        """
        events = self._events(gen, self.deployment.ticket(shadow), turn)
        try:
            first = await anext(events)
        except BackendError as exc:
            await events.aclose()
            raise backend_failure(exc) from exc
        return prepend(first, events)

    # ---- prompts ----------------------------------------------------------------------------

    def _budget(self, prompt: Sequence[int], requested: int | None) -> int:
        """The request's own limit, else ``--max-tokens-default`` (or what the context leaves)."""
        n_ctx = self.backend.n_ctx
        if len(prompt) >= n_ctx or (requested is not None and len(prompt) + requested > n_ctx):
            raise context_length_exceeded(n_ctx, len(prompt), requested)
        if requested is not None:
            return requested
        room = n_ctx - len(prompt)
        return min(room, self.max_tokens_default) if self.max_tokens_default > 0 else room

    def _tokenize(self, text: str, requested: int | None) -> list[int]:
        """Tokenize (on a worker thread), unless the text surely cannot fit the context."""
        self._tokenize_bound(text, requested)
        return self.backend.tokenize(text, add_bos=True)

    def _tokenize_bound(self, text: str, requested: int | None) -> None:
        """A 400 for a text that surely cannot fit the context: no token covers more than
        ``max_token_bytes`` bytes, so that bounds the count from below."""
        n_ctx = self.backend.n_ctx
        at_least = -(-len(text.encode("utf-8", errors="replace")) // self.backend.max_token_bytes)
        if at_least >= n_ctx or (requested is not None and at_least + requested > n_ctx):
            raise context_length_exceeded(n_ctx, at_least, requested, at_least=True)

    def _chat_prompt(
        self,
        messages: list[dict[str, Any]],
        variables: dict[str, Any] | None,
        requested: int | None,
        template: ChatTemplate | None = None,
    ) -> tuple[list[int], RenderedChat]:
        """The prompt's token ids: control-token text in user and tool content stays text unless
        ``--parse-special-in-content`` (kvproxy.model.content_specials)."""
        find = getattr(self.backend, "control_texts", None)
        literals = None
        if find is not None and not self.parse_special_in_content:
            messages, literals = mark_literals(messages, find)
        try:
            rendered = (template or self.backend.chat_template).render_chat(messages, variables=variables)
        except ChatTemplateError as exc:
            raise OpenAIError(400, str(exc), param="messages") from exc
        if literals is None or not literals.texts:
            return self._tokenize(rendered.prompt, requested), rendered
        prompt = literals.restore(rendered.prompt)
        self._tokenize_bound(prompt, requested)
        tokens: list[int] = []
        for i, (text, literal) in enumerate(literals.pieces(rendered.prompt)):
            if i == 0 and literal:
                tokens += self.backend.tokenize("", add_bos=True)
            tokens += self.backend.tokenize(text, add_bos=i == 0, special=not literal)
        return tokens, dataclasses.replace(rendered, prompt=prompt)

    async def _grammar(self, fmt: OutputFormat | None, param: str) -> str | None:
        """The llama.cpp grammar of a JSON response format, or a 400 naming the schema (``param``).
        Built and checked off the event loop, in the grammar compiler's child process."""
        if fmt is None:
            return None
        try:
            return await self.backend.json_grammar(fmt.schema)
        except ValueError as exc:
            _log_refused_schema(exc)
            raise OpenAIError(400, f"Invalid schema for '{param}': {exc}", param=param) from None
        except BackendError as exc:  # no grammar compiler could be started
            raise backend_failure(exc) from exc

    async def _prepare_messages(
        self,
        messages: list[dict[str, Any]],
        limit: int | None,
        req: ChatCompletionRequest,
        *,
        stop: tuple[str, ...],
        top_logprobs: int | None,
        format_param: str,
        variables: dict[str, Any] | None = None,
        turn: ToolTurn | None = None,
    ) -> tuple[GenerationRequest, ReasoningSplitter | None]:
        """The generation, and for a reasoning template the splitter its output goes through."""
        self._check_ready()
        if turn is not None and turn.active:
            fmt_schema = req.output_format
            response_schema = None if fmt_schema is None else (fmt_schema.schema or {"type": "object"})
            grammar = await turn.grammar(self.backend.json_grammar, response_schema)
            if grammar is None:  # nothing forced: a response format still holds
                grammar = await self._grammar(req.output_format, format_param)
        else:
            grammar = await self._grammar(req.output_format, format_param)
        template = None
        if turn is not None:
            messages = turn.messages(messages)
            variables = turn.variables(variables)
            template = with_tool_calls(self.backend.chat_template)
        prompt, rendered = await asyncio.to_thread(self._chat_prompt, messages, variables, limit, template)
        fmt = self.backend.chat_template.reasoning
        gen = GenerationRequest(
            prompt_tokens=prompt,
            max_tokens=self._budget(prompt, limit),
            sampling=sampling(req),
            stop=stop,
            top_logprobs=top_logprobs,
            grammar=grammar,
            special_tokens=getattr(self.backend, "preserved_tokens", frozenset()) if fmt else frozenset(),
        )
        return gen, ReasoningSplitter(fmt, rendered.generation_prompt) if fmt is not None else None

    def _tool_turn(self, req: ChatCompletionRequest) -> ToolTurn | None:
        self._check_ready()  # the template is the loaded model's: a 503 while it loads, not a 500
        return ToolTurn.of(req, with_tool_calls(self.backend.chat_template).template)

    async def _prepare_chat(
        self, req: ChatCompletionRequest, turn: ToolTurn | None = None
    ) -> tuple[GenerationRequest, ReasoningSplitter | None]:
        messages = [m.template_dict() for m in req.messages]
        return await self._prepare_messages(
            messages,
            req.completion_limit,
            req,
            stop=req.stop_sequences(),
            top_logprobs=req.top_logprobs_count,
            format_param="response_format.json_schema.schema",
            variables=req.chat_template_kwargs,
            turn=turn,
        )

    async def prepare_completion(self, req: CompletionRequest) -> GenerationRequest:
        self._check_ready()
        if isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
            text = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
            prompt = await asyncio.to_thread(self._tokenize, text, req.max_tokens)
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
            sampling=sampling(req),
            stop=req.stop_sequences(),
            top_logprobs=req.logprobs,
        )

    # ---- /v1/chat/completions ---------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, shadow: ShadowAsk = NO_ASK) -> ChatCompletion:
        turn = self._tool_turn(req)
        gen, splitter = await self._prepare_chat(req, turn)
        got = await self._collected(gen, shadow, turn)
        # a reasoning model: its thinking apart, as llama-server answers; then the calls
        reasoning, rest = split(got.text, splitter)
        content: str | None = rest
        calls: list[MessageToolCall] = []
        if turn is not None:
            content, calls = turn.parse(rest)
        message = AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(
                    message=message,
                    logprobs=ChoiceLogprobs(content=[wire_logprob(lp) for lp in got.logprobs])
                    if req.logprobs
                    else None,
                    finish_reason=finish_reason(got.done.finish_reason, calls),
                )
            ],
            usage=usage(got.done),
        )

    async def chat_stream(
        self, req: ChatCompletionRequest, shadow: ShadowAsk = NO_ASK
    ) -> AsyncIterator[bytes]:
        turn = self._tool_turn(req)
        gen, splitter = await self._prepare_chat(req, turn)
        events = await self._started(gen, shadow, turn)
        if turn is not None and turn.active:
            return tool_chunks(self._first_chunk(), events, turn, splitter, req.include_usage)
        return self._chat_chunks(req, events, splitter)

    def _first_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
        )

    async def _chat_chunks(
        self,
        req: ChatCompletionRequest,
        events: AsyncGenerator[GenerationEvent, None],
        splitter: ReasoningSplitter | None = None,
    ) -> AsyncIterator[bytes]:
        chunk = self._first_chunk()

        def delta(event: TextDelta) -> ChatCompletionChunk:
            lp = ChoiceLogprobs(content=[wire_logprob(x) for x in event.logprobs]) if req.logprobs else None
            d = ChatDelta(content=event.text)
            if splitter is not None:
                reasoning, content = splitter.push(event.text)
                d = ChatDelta(content=content or None, reasoning_content=reasoning or None)
            chunk.choices = [ChatChunkChoice(delta=d, logprobs=lp)]
            return chunk

        def finish(done: Finished) -> ChatCompletionChunk:
            d = ChatDelta()
            if splitter is not None:  # what was held back as a possible tag
                reasoning, content = splitter.finish()
                d = ChatDelta(content=content or None, reasoning_content=reasoning or None)
            chunk.choices = [ChatChunkChoice(delta=d, finish_reason=done.finish_reason)]
            return chunk

        def final_usage(done: Finished) -> ChatCompletionChunk:
            chunk.choices = []
            chunk.usage = usage(done)
            return chunk

        yield sse.encode(chunk, exclude={"usage"})
        async for out in sse_stream(events, delta, finish, final_usage if req.include_usage else None):
            yield out

    # ---- /v1/completions --------------------------------------------------------------------

    def _completion(
        self, text: str, finish: FinishReason | None, logprobs: CompletionLogprobs | None, rid: str = ""
    ) -> Completion:
        return Completion(
            id=rid or f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=self.backend.model_name,
            system_fingerprint=self.fingerprint,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)],
        )

    async def completion(self, req: CompletionRequest, shadow: ShadowAsk = NO_ASK) -> Completion:
        got = await self._collected(await self.prepare_completion(req), shadow)
        lp = legacy_logprobs(got.logprobs, 0) if req.logprobs is not None else None
        out = self._completion(got.text, got.done.finish_reason, lp)
        out.usage = usage(got.done)
        return out

    async def completion_stream(
        self, req: CompletionRequest, shadow: ShadowAsk = NO_ASK
    ) -> AsyncIterator[bytes]:
        return self._completion_chunks(req, await self._started(await self.prepare_completion(req), shadow))

    async def _completion_chunks(
        self, req: CompletionRequest, events: AsyncGenerator[GenerationEvent, None]
    ) -> AsyncIterator[bytes]:
        offset = 0
        rid = f"cmpl-{uuid.uuid4().hex}"  # one id for every chunk of the stream, as chat streams have

        def delta(event: TextDelta) -> Completion:
            nonlocal offset
            lp = legacy_logprobs(event.logprobs, offset) if req.logprobs is not None else None
            offset += len(event.text)
            return self._completion(event.text, None, lp, rid)

        def final_usage(done: Finished) -> Completion:
            final = self._completion("", None, None, rid)
            final.choices = []
            final.usage = usage(done)
            return final

        def finish(done: Finished) -> Completion:
            return self._completion("", done.finish_reason, None, rid)

        async for out in sse_stream(events, delta, finish, final_usage if req.include_usage else None):
            yield out


async def _parsed(chunks: AsyncIterator[bytes], wants: tuple[bool, int]) -> AsyncIterator[dict[str, Any]]:
    """The embedded chat stream's chunks as the Responses renderer reads them (the relay's are the
    primary's, parsed the same way); its error event breaks the response off."""
    decoder = sse.SSEDecoder()
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            for event in decoder.feed(chunk):
                if event.data is None or not event.data.startswith(b"{"):
                    continue
                data = orjson.loads(event.data)
                if "error" in data:
                    raise StreamBroke(str(data["error"].get("message")))
                for choice in data.get("choices") or []:
                    strip_logprobs(choice, *wants)
                yield data
