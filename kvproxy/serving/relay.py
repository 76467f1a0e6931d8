"""Serving for deployments whose primary is llama-server over HTTP.

The proxy checks only what it must (a JSON object with ``model``, the fields it reads itself) and
leaves every other parameter to the upstream, which supports more than the embedded backend does
(tools, grammars, JSON schemas with ``--jinja``); the upstream's errors come back as OpenAI errors.
Unsampled requests are relayed byte for byte (a request that sets no completion limit gets
``--max-tokens-default`` added first). A shadowed request goes to the primary exactly as an unshadowed
one would, and its answer back byte for byte; the shadow path reads a copy (the answer's text, the
primary's logprobs if the client asked for them). Only a deployment that opts in
(``primary_logprobs``: what the top-K estimator needs, at a measured cost to the primary's speed)
asks for logprobs the client did not, strips them from the answer, and never where llama-server
refuses them (tools + stream). ``/v1/responses``
is served through the primary's chat route (kvproxy.serving.responses_chat, as the embedded backend
serves it; never llama-server's own ``/v1/responses``); other ``/v1`` routes
kvproxy does not serve itself (``/v1/embeddings``, ...) are relayed to the primary as they are.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from kvproxy import sse
from kvproxy.backends.base import BackendError
from kvproxy.backends.grammar_compiler import GrammarCompiler
from kvproxy.deployments.http import HttpDeployment
from kvproxy.errors import OpenAIError, upstream_error
from kvproxy.protocol import ChatCompletion, Choices, Penalty, Temperature, TokenLimit, TopLogprobs, TopP
from kvproxy.protocol_responses import ResponseObject, ResponsesRequest, untyped_input_part
from kvproxy.schema_limits import SchemaLimits
from kvproxy.scoring.job import PrimaryReport, ShadowJob
from kvproxy.serving import forced_tools, responses_chat
from kvproxy.serving.base import SSE_HEADERS, SSE_MEDIA_TYPE, system_fingerprint, validated
from kvproxy.serving.responses_format import ResponsesRenderer, StreamBroke, render_stream
from kvproxy.shadow.ask import ShadowAsk
from kvproxy.shadow.pool import ShadowTicket
from kvproxy.tool_calls import ToolPlan, hermes
from kvproxy.upstream.llama_server import error_object, strip_logprobs
from kvproxy.upstream.replicas import UpstreamFailure

log = logging.getLogger(__name__)

Wants = tuple[bool, int]  # (logprobs asked for, top_logprobs asked for)


@dataclass(frozen=True)
class Relayed:
    """One chat or completion request as the relay forwards it."""

    path: str  # the primary's route
    raw: bytes  # the body as the client sent it (relayed as it is when not shadowed)
    body: dict[str, Any]  # the same, parsed
    stream: bool
    wants: Wants  # what the client asked of logprobs (what its answer keeps)
    source: dict[str, Any]  # what the scorer replays: the messages (and template fields) or prompt


@dataclass(frozen=True)
class Plan:
    """What a shadowed request adds to the client's for scoring: nothing, unless the deployment
    opts in to the primary's logprobs (``primary_logprobs``) and llama-server accepts them, or the
    client asked for as much itself.

    ``top_k``: the top list each logprob entry will carry (0: none); ``hint``: why fewer than the
    deployment's top K come (the skip reason of a top-K estimator)."""

    fields: dict[str, Any]
    top_k: int
    hint: str

    def report(self) -> PrimaryReport:
        return PrimaryReport(top_k=self.top_k, skip_hint=self.hint)


# what a chat template reads of a request (the rest is sampling): the scorer renders the prompt
# through the primary's /apply-template with it, as its chat route did
_NOT_TEMPLATE = ("stream", "stream_options", "logprobs", "top_logprobs", "n_probs")


def _template(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in _NOT_TEMPLATE}


class _Lenient(BaseModel):
    """What proxy mode checks before forwarding: the fields it reads, and OpenAI's ranges for the
    sampling parameters (kvproxy.protocol's, shared with the embedded backend): llama-server took
    ``temperature: 7`` where OpenAI answers a 400 naming the parameter. Everything else goes on as sent."""

    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False
    temperature: Temperature | None = None
    top_p: TopP | None = None


class _Sampling(_Lenient):
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    n: Choices | None = None
    max_tokens: TokenLimit | None = None


class RelayChatRequest(_Sampling):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    max_completion_tokens: TokenLimit | None = None


# llama-server reads token ids as int32 and wraps larger ones (2**32 + 5 became 5): refused here
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class RelayCompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId]
    logprobs: Annotated[int, Field(ge=0)] | None = None


def _text_only(messages: list[dict[str, Any]]) -> None:
    """A 400 for a content part that is not text (an image, audio, a file). kvproxy serves text: the
    embedded backend refuses such parts too, and the shadow path replays prompts as text. A primary
    without a projector answered them with a 500, which reached the client as a 502."""
    for i, message in enumerate(messages):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise OpenAIError(
                    400,
                    f"Content parts of type {kind!r} are not supported: kvproxy serves text only.",
                    param=f"messages.{i}.content.{j}.type",
                    code="unsupported_content",
                )


async def _error_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream as relayed; a failure mid-stream ends it with an SSE error event."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield chunk
        except UpstreamFailure as failure:
            yield sse.encode(upstream_error(failure).body())


def _streaming(chunks: AsyncIterator[bytes], names: Names | None = None) -> StreamingResponse:
    if names is not None:
        chunks = names.stream(chunks)
    return StreamingResponse(_error_events(chunks), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


# a JSON string member as llama-server writes it (no space after the colon; a space allowed):
# quotes inside a string are escaped, so these match keys only, never text the model wrote
_MODEL = re.compile(rb'"model":\s*"(?:[^"\\]|\\.)*"')
_FINGERPRINT = re.compile(rb'"system_fingerprint":\s*"(?:[^"\\]|\\.)*"')


class Names:
    """What the client sees as ``model`` (the name it asked for, not llama-server's GGUF path) and
    ``system_fingerprint`` (kvproxy.serving.base.system_fingerprint, not llama-server's
    ``b0-unknown``), substituted in the relayed bytes: two regex passes over each chunk, no parse
    (docs/benchmarks.md)."""

    def __init__(self, model: str, fingerprint: str) -> None:
        self.model = model
        self.fingerprint = fingerprint
        # as re.sub templates: a backslash in the JSON (an escaped name) must stay one
        self._model = (b'"model":' + orjson.dumps(model)).replace(b"\\", b"\\\\")
        self._fingerprint = (b'"system_fingerprint":' + orjson.dumps(fingerprint)).replace(b"\\", b"\\\\")

    def __call__(self, data: bytes) -> bytes:
        return _FINGERPRINT.sub(self._fingerprint, _MODEL.sub(self._model, data))

    def apply(self, data: dict[str, Any]) -> None:
        """The same on a parsed answer (one kvproxy re-encodes anyway)."""
        if "model" in data:
            data["model"] = self.model
        if "system_fingerprint" in data:
            data["system_fingerprint"] = self.fingerprint

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:  # whole events: open_stream cuts at event boundaries
                yield self(chunk)


class RelayResponsesRequest(_Lenient):
    input: str | Annotated[list[Any], Field(min_length=1)]
    max_output_tokens: TokenLimit | None = None
    top_logprobs: TopLogprobs | None = None


class RelayServing:
    def __init__(self, deployment: HttpDeployment, *, max_tokens_default: int = 0) -> None:
        self.deployment = deployment
        self.max_tokens_default = max_tokens_default  # added to requests that set no limit; 0: none
        self._grammars: GrammarCompiler | None = None  # started on the first forced tool call

    async def _forced_call(
        self, body: dict[str, Any], plan: ToolPlan, stream: bool, shadow: ShadowAsk
    ) -> Response | None:
        """A required or named tool call, forced by grammar (kvproxy.serving.forced_tools), as a chat
        completion; None when the primary's template does not speak Hermes-style calls."""
        answer = await self._forced_answer(body, plan, shadow)
        if answer is None:
            return None
        if stream:
            options = body.get("stream_options")
            include = isinstance(options, dict) and options.get("include_usage") is True
            events = [sse.encode(c, exclude=x) for c, x in forced_tools.chat_chunks(answer, include)]
            events.append(sse.DONE)
            return StreamingResponse(_listed(events), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
        return Response(answer.model_dump_json(), media_type="application/json")

    async def _forced_answer(
        self, body: dict[str, Any], plan: ToolPlan, shadow: ShadowAsk
    ) -> ChatCompletion | None:
        """The forced call's whole answer (its shadow job handed on); None where not Hermes."""
        primary = self.deployment.primary
        source = _template(body)
        rendered = self._answer(await primary.post_json("/apply-template", orjson.dumps(source)))
        prompt = rendered.get("prompt")
        # Hermes-style JSON calls only: Qwen XML (``<function=``) and Gemma 4 stay llama-server's
        if not isinstance(prompt, str) or hermes.OPEN not in prompt or "<function=" in prompt:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(SchemaLimits())
            self._grammars.start()
        try:
            call_grammar = await self._grammars.compile(hermes.call_schema(plan))
        except ValueError as exc:
            raise OpenAIError(400, f"Invalid schema for 'tools': {exc}", param="tools") from None
        except BackendError as exc:
            raise OpenAIError(500, str(exc), type="server_error") from exc
        completion = forced_tools.completion_body(
            body, prompt, hermes.wrap_grammar(call_grammar, plan.parallel)
        )
        ask: dict[str, Any] = {"logprobs": self.deployment.top_k}
        scoring = self._plan(completion, ask, (False, 0), refused=False)
        ticket = self._ticket(shadow, scoring)
        if ticket is not None:
            completion.update(scoring.fields)
        try:
            data = self._answer(await primary.post_json("/v1/completions", orjson.dumps(completion)))
        except BaseException:
            if ticket is not None:
                ticket.abandon()
            raise
        report = scoring.report()
        for choice in data.get("choices") or []:
            entries = strip_logprobs(choice, False, 0) if choice.get("logprobs") else []
            report.add(entries)
        if ticket is not None:
            report.note_text(data)
            report.note_end(data)
            # a raw prompt: no message cuts for the replay to model
            _settle(ticket, report, {"prompt": prompt}, streamed=False)
        names = self._names(body)
        return forced_tools.chat_answer(data, names.model, names.fingerprint)

    def _names(self, body: dict[str, Any]) -> Names:
        """The client's name for the model, and this deployment's fingerprint, for its answer."""
        d = self.deployment
        return Names(str(body["model"]), system_fingerprint(d.build, d.primary_kv))

    def _limited(
        self, raw: bytes, body: dict[str, Any], keys: tuple[str, ...]
    ) -> tuple[bytes, dict[str, Any]]:
        """The request with ``max_tokens_default`` as its limit when it sets none (else as sent)."""
        if self.max_tokens_default <= 0 or any(body.get(k) is not None for k in keys):
            return raw, body
        body = {**body, keys[0]: self.max_tokens_default}
        return orjson.dumps(body), body

    def _plan(self, body: dict[str, Any], ask: dict[str, Any], wants: Wants, *, refused: bool) -> Plan:
        """What a shadowed request adds for scoring (see :class:`Plan`). ``ask``: the logprobs the
        deployment's top K needs; ``refused``: llama-server would refuse them (tools + stream)."""
        if all(body.get(k) == v for k, v in ask.items()):  # the client asked for as much itself
            return Plan({}, self.deployment.top_k, "logprobs_off")
        top = wants[1] if wants[0] else 0  # what the client's own logprobs will carry, if any
        if refused:
            hint = "logprobs_refused" if self.deployment.primary_logprobs else "logprobs_off"
            return Plan({}, top, hint)
        if not self.deployment.primary_logprobs:
            return Plan({}, top, "logprobs_off")
        return Plan(ask, self.deployment.top_k, "logprobs_off")

    async def handle_chat(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(RelayChatRequest, body)
        _text_only(req.messages)
        raw, body = self._limited(raw, body, ("max_tokens", "max_completion_tokens"))
        forced = forced_tools.forced_plan(body)
        if forced is not None:
            try:
                answer = await self._forced_call(body, forced, req.stream, shadow)
            except UpstreamFailure as failure:
                raise upstream_error(failure) from failure
            if answer is not None:
                return answer
        wants = (bool(req.logprobs), req.top_logprobs or 0)
        ask: dict[str, Any] = {"logprobs": True, "top_logprobs": max(wants[1], self.deployment.top_k)}
        # llama-server: "logprobs is not supported with tools + stream" (a 400 to a valid request)
        plan = self._plan(body, ask, wants, refused=req.stream and bool(body.get("tools")))
        relayed = Relayed("/v1/chat/completions", raw, body, req.stream, wants, _template(body))
        return await self._serve(relayed, shadow, plan)

    async def handle_completion(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(RelayCompletionRequest, body)
        raw, body = self._limited(raw, body, ("max_tokens",))
        wants = (req.logprobs is not None, req.logprobs or 0)
        ask: dict[str, Any] = {"logprobs": max(wants[1], self.deployment.top_k)}
        plan = self._plan(body, ask, wants, refused=False)
        prompt = (
            req.prompt[0]
            if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str)
            else req.prompt
        )
        relayed = Relayed("/v1/completions", raw, body, req.stream, wants, {"prompt": prompt})
        return await self._serve(relayed, shadow, plan)

    async def handle_other(self, path: str, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        """A route kvproxy does not serve itself, relayed to the primary as it is (both ways)."""
        try:
            if body.get("stream") is True:
                return _streaming(await self.deployment.primary.open_stream(path, raw, ends=None))
            return await self._relay(path, raw, stream=False)
        except UpstreamFailure as failure:
            raise upstream_error(failure) from failure

    async def handle_responses(self, raw: bytes, body: dict[str, Any], shadow: ShadowAsk) -> Response:
        req = validated(RelayResponsesRequest, body)
        untyped = untyped_input_part(body)
        if untyped is not None:  # as OpenAI answers it; llama-server's own route would guess
            raise OpenAIError(
                400,
                f"Missing required parameter: '{untyped}'.",
                param=untyped,
                code="missing_required_parameter",
            )
        messages = responses_chat.translatable(body)
        if messages is None:  # what a chat completion cannot express: the embedded backend's 400
            validated(ResponsesRequest, body)
            raise OpenAIError(400, "This input cannot be served as a chat completion.", param="input")
        try:
            return await self._responses_via_chat(body, messages, req.stream, shadow)
        except UpstreamFailure as failure:
            raise upstream_error(failure) from failure
        except OpenAIError as exc:  # named as the Responses request has it (text.format.schema, ...)
            exc.detail.param = responses_chat.responses_param(exc.detail.param)
            raise

    async def _responses_via_chat(
        self,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        stream: bool,
        shadow: ShadowAsk,
    ) -> Response:
        cap = responses_chat.output_cap(body, self.max_tokens_default)
        chat = responses_chat.chat_body(body, messages, self.max_tokens_default)
        forced = forced_tools.forced_plan(chat)
        if forced is not None:
            answer = await self._forced_answer(chat, forced, shadow)
            if answer is not None:
                return _forced_response(
                    ResponsesRenderer(_echoable(body), str(body["model"]), cap), answer, stream
                )
        wants = responses_chat.wants_logprobs(body)
        source = _template(chat)
        ask: dict[str, Any] = {"logprobs": True, "top_logprobs": max(wants[1], self.deployment.top_k)}
        chat_wants = (bool(chat.get("logprobs")), int(chat.get("top_logprobs") or 0))
        # llama-server: "logprobs is not supported with tools + stream"
        plan = self._plan(chat, ask, chat_wants, refused=stream and bool(chat.get("tools")))
        ticket = self._ticket(shadow, plan)
        if ticket is not None:
            chat.update(plan.fields)
        renderer = ResponsesRenderer(_echoable(body), str(body["model"]), cap)
        primary = self.deployment.primary
        report = plan.report()
        try:
            if stream:
                chunks = await primary.open_stream("/v1/chat/completions", orjson.dumps(chat))
                chats = _chat_chunks(chunks, ticket, report, wants, source)
                events = render_stream(renderer, chats)
                return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
            content = await primary.post_json("/v1/chat/completions", orjson.dumps(chat))
            data = self._answer(content)
            try:
                choice = data["choices"][0]
            except (KeyError, IndexError, TypeError) as exc:
                raise self._invalid_json(ValueError(f"no choices ({exc})")) from exc
        except BaseException:
            if ticket is not None:
                ticket.abandon()
            raise
        entries = strip_logprobs(choice, *wants)
        if ticket is not None:
            report.add(entries)
            report.note_text(data)
            report.note_end(data)
            _settle(ticket, report, source, streamed=False)
        out: ResponseObject = renderer.from_chat(data)
        return Response(out.model_dump_json(), media_type="application/json")

    async def _serve(self, relayed: Relayed, shadow: ShadowAsk, plan: Plan) -> Response:
        try:
            ticket = self._ticket(shadow, plan)
            names = self._names(relayed.body)
            if ticket is None:
                return await self._relay(relayed.path, relayed.raw, relayed.stream, names)
            return await self._shadowed(relayed, ticket, plan, names)
        except UpstreamFailure as failure:
            raise upstream_error(failure) from failure

    def _ticket(self, shadow: ShadowAsk, plan: Plan) -> ShadowTicket | None:
        """The request's shadow ticket, if sampled; a request whose job the reference cannot score
        (a top-K estimator without the primary's top K) is skipped at once, its answer unread."""
        ticket = self.deployment.ticket(shadow)
        if ticket is not None and plan.top_k < self.deployment.top_k and self.deployment.scores_top_k:
            ticket.skip(plan.hint)
            return None
        return ticket

    async def _relay(self, path: str, raw: bytes, stream: bool, names: Names | None = None) -> Response:
        """Unsampled: the bytes as they are, both ways (with ``names`` substituted)."""
        primary = self.deployment.primary
        if stream:
            return _streaming(await primary.open_stream(path, raw), names)
        content = await primary.post_json(path, raw)
        self._answer(content)  # relayed as sent, but never a 200 that no client can parse
        return Response(names(content) if names else content, media_type="application/json")

    async def _shadowed(self, relayed: Relayed, ticket: ShadowTicket, plan: Plan, names: Names) -> Response:
        """The request as sent (or with what ``plan`` adds); its answer as received (or without what
        was added), with what the shadow path needs read off a copy."""
        path, raw, body, stream = relayed.path, relayed.raw, relayed.body, relayed.stream
        wants, source = relayed.wants, relayed.source
        primary = self.deployment.primary
        upstream_body = orjson.dumps({**body, **plan.fields}) if plan.fields else raw
        report = plan.report()
        try:
            if stream:
                events = await primary.open_stream(path, upstream_body)
                if not plan.fields:
                    return _streaming(_observe_stream(events, ticket, report, source), names)
                return _streaming(_rewrite_stream(events, ticket, report, wants, source), names)
            content = await primary.post_json(path, upstream_body)
            data = self._answer(content)
        except BaseException:
            ticket.abandon()
            raise
        for choice in data.get("choices") or []:
            if plan.fields:
                report.add(strip_logprobs(choice, *wants))
            elif isinstance(choice, dict) and choice.get("logprobs"):
                report.add(_entries(choice))
        report.note_text(data)
        report.note_end(data)
        _settle(ticket, report, source, streamed=False)
        if plan.fields:
            names.apply(data)
            return Response(orjson.dumps(data), media_type="application/json")
        return Response(names(content), media_type="application/json")

    def _answer(self, content: bytes) -> dict[str, Any]:
        """The primary's 200 body, parsed: a body that is not a JSON object is a 502
        ``upstream_invalid_response``, an error object said with a 200 a 502 ``upstream_error``."""
        try:
            data = orjson.loads(content)
        except ValueError as exc:
            raise self._invalid_json(exc) from exc
        if not isinstance(data, dict):
            raise self._invalid_json(ValueError(f"a JSON {type(data).__name__}, not an object"))
        failure = error_object(None, data)
        if failure is not None:
            self.deployment.primary.record_error("status")
            raise upstream_error(failure)
        return data

    def _invalid_json(self, exc: ValueError) -> OpenAIError:
        self.deployment.primary.record_error("invalid_response")
        return OpenAIError(
            502,
            f"The upstream answered with invalid JSON: {exc}",
            type="server_error",
            code="upstream_invalid_response",
        )


async def _rewrite_stream(
    chunks: AsyncIterator[bytes],
    ticket: ShadowTicket,
    report: PrimaryReport,
    wants: Wants,
    source: dict[str, Any],
) -> AsyncIterator[bytes]:
    """Re-emit the upstream's SSE events without the logprobs the client did not ask for; events
    that need no change go out as they came."""
    decoder = sse.SSEDecoder()
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                out = _rewrite_events(decoder.feed(chunk), ticket, report, wants, source)
                if out:
                    yield out
        out = _rewrite_events(decoder.close(), ticket, report, wants, source)
        if out or decoder.pending.strip():
            yield out + decoder.pending
    finally:
        ticket.abandon()  # a no-op once submitted


async def _observe_stream(
    chunks: AsyncIterator[bytes], ticket: ShadowTicket, report: PrimaryReport, source: dict[str, Any]
) -> AsyncIterator[bytes]:
    """The upstream's SSE bytes as they came, read on the side for the shadow path."""
    decoder = sse.SSEDecoder()
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                for event in decoder.feed(chunk):  # whole events: open_stream cuts at boundaries
                    data = _event_json(event)
                    if data is not None:
                        _note(report, data)
                    elif event.is_done:
                        _settle(ticket, report, source, streamed=True)
                yield chunk
    finally:
        ticket.abandon()  # a no-op once submitted


def _note(report: PrimaryReport, data: dict[str, Any]) -> None:
    """What one unchanged answer (or stream chunk) tells the shadow path."""
    for choice in data.get("choices") or []:
        if isinstance(choice, dict) and choice.get("logprobs"):  # the client asked for them
            report.add(_entries(choice))
    report.note_text(data)
    report.note_end(data)


def _entries(choice: dict[str, Any]) -> list[dict[str, Any]]:
    lp = choice.get("logprobs")
    entries = lp.get("content") if isinstance(lp, dict) else None
    return entries if isinstance(entries, list) else []


def _rewrite_events(
    events: list[sse.Event],
    ticket: ShadowTicket,
    report: PrimaryReport,
    wants: Wants,
    source: dict[str, Any],
) -> bytes:
    out = []
    for event in events:
        out.append(_rewrite_event(event, report, wants))
        if event.is_done:
            _settle(ticket, report, source, streamed=True)
    return b"".join(out)


def _settle(ticket: ShadowTicket, report: PrimaryReport, source: dict[str, Any], *, streamed: bool) -> None:
    """Hand the job on: with logprob entries only if they line up with the tokens; without, as text
    (the scorer re-tokenizes it, or skips it)."""
    if not report.token_ids and not report.malformed:
        report.top_k = 0  # no entries came: nothing of a top K to compare
        ticket.submit(ShadowJob(source=source, report=report))
    elif report.aligned(streamed=streamed):
        ticket.submit(ShadowJob(source=source, report=report))
    else:
        log.debug(
            "shadow job dropped: %d logprob entries for %s tokens",
            len(report.token_ids),
            report.completion_tokens,
        )
        ticket.abandon()


def _rewrite_event(event: sse.Event, report: PrimaryReport, wants: Wants) -> bytes:
    """The event to send on, without the logprobs the client did not ask for."""
    if event.data is None or not event.data.startswith(b"{"):
        return event.raw
    try:
        data = orjson.loads(event.data)
    except ValueError:
        return event.raw
    if not isinstance(data, dict) or "choices" not in data:
        return event.raw
    report.note_end(data)
    report.note_text(data)
    changed = False
    for choice in data["choices"]:
        if choice.get("logprobs"):
            report.add(strip_logprobs(choice, *wants))
            changed = True
        elif not wants[0] and "logprobs" in choice:
            del choice["logprobs"]
            changed = True
    return sse.encode(orjson.dumps(data), newline=event.newline) if changed else event.raw


def _echoable(body: dict[str, Any]) -> ResponsesRequest:
    """The request as the renderer echoes it: as kvproxy's model reads it, or (when it holds what
    only the upstream takes, such as images) its defaults."""
    try:
        return ResponsesRequest.model_validate(body)
    except ValueError:
        return ResponsesRequest.model_construct(model=str(body.get("model")), input="")


async def _chat_chunks(
    chunks: AsyncIterator[bytes],
    ticket: ShadowTicket | None,
    report: PrimaryReport,
    wants: Wants,
    source: dict[str, Any],
) -> AsyncIterator[dict[str, Any]]:
    """The primary's chat stream, parsed, without the logprobs the client did not ask for; what it
    reported goes to the shadow path as a chat stream's would."""
    decoder = sse.SSEDecoder()
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                for event in decoder.feed(chunk):
                    if event.is_done:
                        if ticket is not None:
                            _settle(ticket, report, source, streamed=True)
                        continue
                    data = _event_json(event)
                    if data is None:
                        continue
                    if ticket is not None:
                        report.note_end(data)
                        report.note_text(data)
                    for choice in data.get("choices") or []:
                        entries = strip_logprobs(choice, *wants) if choice.get("logprobs") else []
                        if ticket is not None and entries:
                            report.add(entries)
                    yield data
    except UpstreamFailure as failure:
        raise StreamBroke(failure.message) from failure
    finally:
        if ticket is not None:
            ticket.abandon()  # a no-op once submitted


def _forced_response(renderer: ResponsesRenderer, answer: ChatCompletion, stream: bool) -> Response:
    """A forced call's answer as a Responses object or its events."""
    if not stream:
        out: ResponseObject = renderer.from_chat(answer.model_dump(mode="json"))
        return Response(out.model_dump_json(), media_type="application/json")

    async def chats() -> AsyncIterator[dict[str, Any]]:
        for chunk, exclude in forced_tools.chat_chunks(answer, include_usage=True):
            yield chunk.model_dump(mode="json", exclude=exclude)

    events = render_stream(renderer, chats())
    return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


async def _listed(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _event_json(event: sse.Event) -> dict[str, Any] | None:
    if event.data is None or not event.data.startswith(b"{"):
        return None
    try:
        data = orjson.loads(event.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
