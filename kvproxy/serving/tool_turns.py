"""Function calling in the embedded serving: one request's tools through prompt, grammar and parse.

:class:`ToolTurn` holds what a request with ``tools`` needs (its plan and its template's format) and
applies the pure functions of kvproxy.tool_calls: the history as the template takes it, the grammar
that forces a call (compiled in the grammar compiler's child process under the schema limits, as
any response-format schema: tools are untrusted input), and the answer's calls. A streamed tool turn
holds its text back until the generation ends, then sends the calls as OpenAI tool-call deltas (one
delta per call, with its id, name and whole arguments): a call is only known to be one once its
JSON is complete (docs/function-calling.md).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kvproxy import sse
from kvproxy.backends.base import BackendError, Finished, GenerationEvent, TextDelta
from kvproxy.errors import OpenAIError
from kvproxy.model.reasoning import QWEN, ReasoningSplitter
from kvproxy.protocol import (
    CalledFunction,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    FinishReason,
    FunctionDelta,
    MessageToolCall,
    ToolCallDelta,
)
from kvproxy.serving.openai_format import backend_failure, usage
from kvproxy.tool_calls import (
    ToolFormat,
    ToolPlan,
    gemma4,
    generic,
    hermes,
    new_call_id,
    qwen_xml,
    tool_format,
)
from kvproxy.tool_calls.formats import UnsupportedToolFormat

Compile = Callable[[dict[str, Any]], Awaitable[str]]


def has_tool_history(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


@dataclass(frozen=True)
class ToolTurn:
    format: ToolFormat
    plan: ToolPlan | None  # None: no tools in the request, only calls and results in its history
    template: str = ""

    @classmethod
    def of(cls, req: ChatCompletionRequest, template: str) -> ToolTurn | None:
        """The request's tool turn, or None when it has no tools and no tool history; a template
        with a tool-call format kvproxy does not parse is a 400."""
        messages_have_tools = any(m.role == "tool" or m.tool_calls for m in req.messages)
        if not req.tools and not messages_have_tools:
            return None
        try:
            fmt = tool_format(template)
        except UnsupportedToolFormat as exc:
            raise OpenAIError(
                400,
                f"tools are not supported with this model's chat template: kvproxy does not parse {exc} "
                "yet; serve it with llama-server and put kvproxy in front (kvproxy serve --primary URL)",
                param="tools",
            ) from None
        # unset parallel_tool_calls: llama-server's default is the template's (true for the formats
        # that write a list of calls), except when a call is forced: then one (a small model forced
        # by a grammar that allows more keeps writing calls until the limit cuts it; the proxy
        # forces one call by the same rule, kvproxy.serving.forced_tools)
        forced = req.tool_choice not in (None, "auto", "none")
        return cls(
            fmt, req.tool_plan(parallel_default=fmt is not ToolFormat.GENERIC and not forced), template
        )

    @property
    def active(self) -> bool:
        return self.plan is not None and self.plan.active

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.format is ToolFormat.GENERIC:
            return generic.history(messages, self.plan)
        if self.format is ToolFormat.GEMMA4:
            return gemma4.history(hermes.history(messages), self.template)
        return hermes.history(messages)

    def variables(self, variables: dict[str, Any] | None) -> dict[str, Any] | None:
        """The template's variables: ``tools`` for a template that describes them itself (with
        ``tool_choice: none`` too, as llama-server passes them)."""
        if self.plan is None or self.format is ToolFormat.GENERIC:
            return variables
        return {**(variables or {}), "tools": list(self.plan.tools)}

    async def grammar(self, compile_schema: Compile, response_schema: dict[str, Any] | None) -> str | None:
        """The grammar the answer must follow: the generic format's always (a call or a response),
        the Hermes format's when a call is required; None when nothing is forced (the tools' schemas
        are compiled all the same, so that one past the limits or unresolvable is a 400)."""
        plan = self.plan
        if plan is None or not plan.active:
            return None
        try:
            if self.format is ToolFormat.GENERIC:
                return await compile_schema(generic.output_schema(plan, response_schema))
            if not plan.choice.forced:
                # compiled and dropped: a schema that cannot be compiled is a 400 with ``auto``
                # too, as llama-server's lazy grammar makes it
                await compile_schema(hermes.call_schema(plan))
                return None
            if self.format is ToolFormat.GEMMA4:
                return gemma4.grammar(plan)
            if self.format is ToolFormat.QWEN_XML:
                values = qwen_xml.values_schema(plan)
                return qwen_xml.grammar(plan, None if values is None else await compile_schema(values))
            return hermes.wrap_grammar(await compile_schema(hermes.call_schema(plan)), plan.parallel)
        except ValueError as exc:
            raise OpenAIError(400, f"Invalid schema for 'tools': {exc}", param="tools") from None
        except BackendError as exc:
            raise backend_failure(exc) from exc

    def parse(self, text: str) -> tuple[str | None, list[MessageToolCall]]:
        """The answer's content and its calls (ids made where the model gave none, or gave one that
        another call has already: a client matches results to calls by id)."""
        if not self.active:
            return text, []
        plan = self.plan
        assert plan is not None
        if self.format is ToolFormat.GEMMA4:
            content, calls = gemma4.parse(text, plan)
        elif self.format is ToolFormat.QWEN_XML:
            content, calls = qwen_xml.parse(text, plan)
        else:
            content, calls = (generic if self.format is ToolFormat.GENERIC else hermes).parse(text)
        out: list[MessageToolCall] = []
        for c in calls:
            known = {m.id for m in out}
            call_id = c.id if c.id and c.id not in known else new_call_id()
            out.append(
                MessageToolCall(id=call_id, function=CalledFunction(name=c.name, arguments=c.arguments))
            )
        return content, out


def finish_reason(reason: FinishReason, calls: list[MessageToolCall]) -> FinishReason:
    return "tool_calls" if calls and reason == "stop" else reason


def split(text: str, splitter: ReasoningSplitter | None) -> tuple[str | None, str]:
    """A reasoning model's thinking apart from the rest (the rest is what holds the calls)."""
    if splitter is None:
        return None, text
    r1, c1 = splitter.push(text)
    r2, c2 = splitter.finish()
    reasoning, rest = r1 + r2, c1 + c2
    # Qwen3.5's thinking also ends where a call starts (llama.cpp's thinking end tags include
    # <tool_call>): a forced call is written straight after the generation prompt's <think>
    cut = reasoning.find(qwen_xml.OPEN) if splitter.fmt is QWEN else -1
    if cut >= 0:
        reasoning, rest = reasoning[:cut], reasoning[cut:] + rest
    return (reasoning if reasoning.strip() else None), rest


async def tool_chunks(
    chunk: ChatCompletionChunk,
    events: AsyncGenerator[GenerationEvent, None],
    turn: ToolTurn,
    splitter: ReasoningSplitter | None,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """A streamed tool turn: the role chunk, then (once generated) reasoning, content, each call as
    one tool-call delta, the finish chunk, usage if asked, ``[DONE]``."""
    yield sse.encode(chunk, exclude={"usage"})
    parts: list[str] = []
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                continue
            for out in _final(chunk, "".join(parts), event, turn, splitter, include_usage):
                yield out
            return
    except BackendError as exc:
        yield sse.encode(backend_failure(exc).body())
    finally:
        await events.aclose()


def _final(
    chunk: ChatCompletionChunk,
    text: str,
    done: Finished,
    turn: ToolTurn,
    splitter: ReasoningSplitter | None,
    include_usage: bool,
) -> list[bytes]:
    reasoning, rest = split(text, splitter)
    content, calls = turn.parse(rest)
    out = []
    if reasoning or content:
        chunk.choices = [
            ChatChunkChoice(delta=ChatDelta(content=content or None, reasoning_content=reasoning))
        ]
        out.append(sse.encode(chunk, exclude={"usage"}))
    for i, call in enumerate(calls):
        d = ToolCallDelta(
            index=i,
            id=call.id,
            type="function",
            function=FunctionDelta(name=call.function.name, arguments=call.function.arguments),
        )
        chunk.choices = [ChatChunkChoice(delta=ChatDelta(tool_calls=[d]))]
        out.append(sse.encode(chunk, exclude={"usage"}))
    chunk.choices = [
        ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason(done.finish_reason, calls))
    ]
    out.append(sse.encode(chunk, exclude={"usage"}))
    if include_usage:
        chunk.choices = []
        chunk.usage = usage(done)
        out.append(sse.encode(chunk))
    out.append(sse.DONE)
    return out
