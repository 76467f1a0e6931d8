"""OpenAI's Responses API (``POST /v1/responses``) as kvproxy accepts and returns it.

kvproxy keeps no state between requests, so it serves the Responses API as with ``store: false``:
the whole conversation comes in ``input`` (a string, or a list of messages), ``instructions`` become
the system message, and what needs stored state (``previous_response_id``, ``conversation``,
``background``, stored ``prompt`` templates, item references) or built-in tools is a 400 naming it.
``store: true`` is accepted (it cannot change the output) and answered as ``store: false``.

Function tools are taken (as chat completions take them), and so are the ``function_call`` and
``function_call_output`` items a client sends back (an assistant's tool calls, ``role: tool``
messages). The output is an assistant message with one ``output_text`` part and/or ``function_call``
items, in the shape of OpenAI's published OpenAPI spec (tests/data holds a pinned copy;
tests/openai_spec.py validates against it). Both modes build it from a chat completion
(kvproxy.serving.responses_chat).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from kvproxy.protocol import (
    NO_REASONING,
    NO_VERBOSITY,
    TOOLS_REFUSAL,
    Temperature,
    TokenLimit,
    TopLogprobs,
    TopP,
    refuse_media_parts,
    refuse_unless,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"
FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATELESS = (
    "kvproxy keeps no responses (it answers as with store: false); send the whole conversation in input"
)
BUILT_IN_TOOLS = "kvproxy has no built-in tools"


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"{name} is not supported: {why}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponsesTextFormat(_Strict):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its fields inline."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and not FORMAT_NAME.fullmatch(value):
            raise ValueError("the name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        return value


class ResponsesText(_Strict):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, value: str | None) -> str | None:
        return refuse_unless("verbosity", value, ("medium",), NO_VERBOSITY)


class ResponsesReasoning(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: str | None = None
    summary: str | None = None

    @field_validator("effort")
    @classmethod
    def _no_effort(cls, value: str | None) -> str | None:
        return refuse_unless("reasoning.effort", value, ("none",), NO_REASONING)

    @field_validator("summary")
    @classmethod
    def _no_summary(cls, value: str | None) -> str | None:
        if value is not None:
            raise _unsupported("reasoning.summary", NO_REASONING)
        return value


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None  # no obfuscation padding is ever added


def untyped_part(content: Any) -> int | None:
    """The index of the first content part without a string ``type`` (OpenAI answers it 400)."""
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return i
    return None


def untyped_input_part(body: dict[str, Any]) -> str | None:
    """Where a Responses request has a content part without ``type`` (``input[i].content[j].type``),
    for the relay, which checks no more of the input than it must."""
    given = body.get("input")
    for i, item in enumerate(given if isinstance(given, list) else []):
        j = untyped_part(item.get("content")) if isinstance(item, dict) else None
        if j is not None:
            return f"input[{i}].content[{j}].type"
    return None


class InputMessage(BaseModel):
    """A message of ``input``. Output messages a client sends back as it received them carry
    ``id``, ``status`` and ``output_text`` parts with annotations: those keys are ignored."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        untyped = untyped_part(value)
        if untyped is not None:  # OpenAI: 400 "Missing required parameter"; no guessing it is text
            raise ValueError(f"content[{untyped}].type is required")
        refuse_media_parts(value, ("input_text", "output_text", "refusal"))
        if isinstance(value, list):
            for part in value:
                key = "refusal" if part.get("type") == "refusal" else "text"
                if not isinstance(part.get(key), str):
                    raise ValueError(f"a content part of type '{part.get('type')}' needs a string '{key}'")
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") != "refusal")

    def template_dict(self) -> dict[str, Any]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


_ITEM_REFUSALS = {
    "custom_tool_call": ("tool calls", TOOLS_REFUSAL),
    "custom_tool_call_output": ("tool call outputs", TOOLS_REFUSAL),
    "item_reference": ("item_reference", STATELESS),
    "reasoning": ("reasoning items", NO_REASONING),
}


class FunctionCallItem(BaseModel):
    """A ``function_call`` the model made, sent back in ``input`` (an assistant tool call)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """A ``function_call_output``: what the client's function returned (a ``role: tool`` message)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]

    @field_validator("output")
    @classmethod
    def _text_output(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        refuse_media_parts(value, ("input_text", "output_text"))
        return value


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem
_ITEMS: dict[str, type[BaseModel]] = {
    "message": InputMessage,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}


def _input_message(index: int, item: Any) -> InputItem:
    if not isinstance(item, dict):
        raise ValueError(f"input[{index}] must be an object")
    kind = item.get("type", "message")
    if kind in _ITEM_REFUSALS:
        name, why = _ITEM_REFUSALS[kind]
        raise _unsupported(name, why)
    if kind not in _ITEMS:
        raise _unsupported(f"input items of type '{kind}'", BUILT_IN_TOOLS)
    try:
        return _ITEMS[kind].model_validate(item)  # type: ignore[return-value]
    except ValidationError as exc:  # said in one line, naming the item
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("str", "list[")))
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ValueError(f"input[{index}]{'.' + where if where else ''}: {msg}") from None


class ResponsesRequest(_Strict):
    model: str
    input: str | Annotated[list[Any], Field(min_length=1)]
    instructions: str | None = None
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    max_output_tokens: TokenLimit | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: TopLogprobs | None = None
    include: list[str] | None = None
    text: ResponsesText | None = None
    reasoning: ResponsesReasoning | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # accepted and ignored (kvproxy.protocol.IGNORED_PARAMETERS): they cannot change the output
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    # stateful: refused unless empty
    previous_response_id: str | None = None
    conversation: Any | None = None
    background: bool | None = None
    prompt: Any | None = None
    # llama.cpp sampling extensions (llama-server takes them on this route too)
    seed: int | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None

    @field_validator("input")
    @classmethod
    def _messages_only(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list):
            return [_input_message(i, item) for i, item in enumerate(value)]
        return value

    @field_validator("previous_response_id", "conversation", "prompt")
    @classmethod
    def _stateless(cls, value: Any, info: Any) -> Any:
        if value:
            raise _unsupported(info.field_name, STATELESS)
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("background", STATELESS)
        return value

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(value or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "custom":
                raise _unsupported("custom tools", "only function tools are (as chat completions take them)")
            if kind != "function":
                raise _unsupported(f"the built-in tool {kind!r}", BUILT_IN_TOOLS)
            if not isinstance(tool.get("name"), str) or not FORMAT_NAME.fullmatch(tool["name"]):
                raise ValueError(f"tools[{i}].name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _function_choice(cls, value: Any) -> Any:
        if value in (None, "none", "auto", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
            return value
        raise _unsupported("tool_choice", "it takes none, auto, required or {type: function, name}")

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise _unsupported("truncation 'auto'", "input is never truncated; a prompt too long is a 400")
        return value


# ---- the response object and its stream events --------------------------------------------------


class ResponsesTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ResponsesLogprob(ResponsesTopLogprob):
    top_logprobs: list[ResponsesTopLogprob]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ResponsesLogprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    """A ``function_call`` output item: one tool call of the chat completion it was built from."""

    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # every request is prefilled from scratch
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    previous_response_id: None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    service_tier: Literal["default"] = "default"
    store: bool = False  # nothing is kept, whatever the request said
    temperature: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"})
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int = 0
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"
    usage: ResponsesUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the spec does not let these be null: absent until known (usage) or when not given (user)
        data: dict[str, Any] = handler(self)
        for key in ("user", "usage"):
            if data.get(key) is None:
                data.pop(key, None)
        return data
