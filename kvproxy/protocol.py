"""The OpenAI wire format kvproxy accepts and returns, as pydantic models.

Requests are strict in the way OpenAI's own API is strict: an unknown field is a 400 ("Unrecognized
request argument"), and a parameter kvproxy cannot honour (``n > 1``, ``logit_bias``, audio,
``echo``) is a 400 naming that parameter, never silently ignored. Known OpenAI fields that cannot
change the output here are accepted and ignored (:data:`IGNORED_PARAMETERS`, listed in the README).
llama.cpp's own sampling extensions ``top_k``, ``min_p`` and ``repeat_penalty`` are accepted as
llama-server accepts them. The Responses API's models are in :mod:`kvproxy.protocol_responses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from kvproxy.tool_calls.spec import ToolChoice, ToolPlan

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20

# OpenAI's ranges for the sampling parameters, in one place: the embedded backend's models below,
# the Responses request (kvproxy.protocol_responses) and proxy mode's lenient checks
# (kvproxy.serving.relay) all use these, so a value OpenAI answers with a 400 is a 400 in every mode.
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence_penalty, frequency_penalty
TokenLimit = Annotated[int, Field(ge=1)]  # max_tokens, max_completion_tokens, max_output_tokens
Choices = Annotated[int, Field(ge=1)]  # n
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]

# Known OpenAI request fields that cannot change what kvproxy generates: accepted, then ignored.
IGNORED_PARAMETERS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "stream_options.include_obfuscation",
)
# the Responses API's tools (kvproxy.protocol_responses): not parsed there yet
TOOLS_REFUSAL = (
    "kvproxy's embedded backend does not parse tool calls; serve this model with llama-server and put "
    "kvproxy in front of it (kvproxy serve --primary URL), where llama-server handles tools"
)
# chat's legacy ``functions`` / ``function_call`` (before ``tools``)
FUNCTIONS_REFUSAL = "use tools of type function (OpenAI's tools and tool_choice)"
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
IMAGE_REFUSAL = "this deployment's model takes text only"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unsupported(name: str, why: str) -> ValueError:
    return ValueError(f"{name} is not supported: {why}")


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


_MEDIA_PARTS = {
    "image_url": "image input",
    "input_image": "image input",
    "input_audio": "audio input",
    "input_file": "file input",
    "file": "file input",
}


def refuse_media_parts(content: Any, text_types: tuple[str, ...]) -> None:
    """A clear 400 for a content part kvproxy cannot read (images, audio, files), before pydantic
    reports it as a shape mismatch."""
    if not isinstance(content, list):
        return
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise _unsupported(_MEDIA_PARTS[kind], f"{IMAGE_REFUSAL} (content part type '{kind}')")
        if isinstance(kind, str) and kind not in text_types:
            raise ValueError(f"content part type '{kind}' is not supported; use {' or '.join(text_types)}")


class FunctionSpec(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Strict):
    """A tool the model may call: OpenAI's function tool (the only kind kvproxy offers)."""

    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call in an assistant message: in a request's history, or in an answer."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    # Clients often send back an assistant message exactly as they received it (with refusal,
    # annotations, audio: null ...), so unknown keys are ignored here; ones that would carry meaning
    # kvproxy cannot honour are rejected below.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    # an earlier answer's reasoning, as llama-server returns and accepts it (reasoning templates
    # read it back)
    reasoning_content: str | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    function_call: Any | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        refuse_media_parts(value, ("text",))
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        if value:
            raise _unsupported("function_call", FUNCTIONS_REFUSAL)
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs a tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it ("developer" is OpenAI's new name for system):
        content parts stay a list (the template decides, kvproxy.model.chat_template), and an assistant's
        reasoning goes along, as llama-server passes them."""
        role = "system" if self.role == "developer" else self.role
        content: Any = (
            self.text() if not isinstance(self.content, list) else [p.model_dump() for p in self.content]
        )
        out = {"role": role, "content": content}
        if self.role == "assistant" and self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # no obfuscation padding is ever added: nothing to turn off


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema`` (chat) and the flat ``text.format`` of the Responses API."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


@dataclass(frozen=True)
class OutputFormat:
    """What a JSON response format asks of generation: any JSON object, or one matching ``schema``
    (an empty schema: any JSON value). Turned into a llama.cpp grammar by the embedded backend."""

    schema: dict[str, Any] | None = None  # None: json_object


_T = TypeVar("_T")


def refuse_unless(name: str, value: _T, allowed: tuple[Any, ...], why: str) -> _T:
    """A known parameter is accepted only with a value that changes nothing here."""
    if value is not None and value not in allowed:
        raise _unsupported(f"{name} {value!r}" if isinstance(value, str) else name, why)
    return value


NO_REASONING = "this model does not reason (accepted: none)"
NO_VERBOSITY = "this model has no verbosity control (accepted: medium, the default)"


class _SamplingFields(_Strict):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: TokenLimit | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    n: Choices | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # ignored, as the other IGNORED_PARAMETERS
    # llama.cpp sampling extensions (as llama-server accepts them)
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0.0)] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _unsupported("n > 1", "kvproxy returns one choice per request")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise _unsupported("logit_bias", "the embedded sampler does not apply token biases")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenLimit | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    # accepted and ignored (IGNORED_PARAMETERS): they cannot change the output here
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    # known, and refused unless their value changes nothing
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # llama-server's extension: extra chat-template variables (e.g. {"enable_thinking": false})
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, value: Any) -> Any:
        if value:
            raise _unsupported("functions and function_call", FUNCTIONS_REFUSAL)
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [t.function.name for t in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError(
                'must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'
            )
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(cls, value: ToolChoiceParam | None, info: ValidationInfo) -> ToolChoiceParam | None:
        tools = info.data.get("tools") or []
        if value is None or value == "none" or (value == "auto" and not tools):
            return value
        if not tools:
            raise ValueError("'tool_choice' is only allowed when 'tools' are specified")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"no function named '{value.function.name}' is among the tools")
        return value

    @field_validator("reasoning_effort")
    @classmethod
    def _no_reasoning(cls, value: str | None) -> str | None:
        return refuse_unless("reasoning_effort", value, ("none",), NO_REASONING)

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, value: str | None) -> str | None:
        return refuse_unless("verbosity", value, ("medium",), NO_VERBOSITY)

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(m != "text" for m in value):
            raise _unsupported("modalities other than text", "kvproxy generates text only")
        return value

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise _unsupported("audio", "kvproxy generates text only")
        return value

    @field_validator("prediction")
    @classmethod
    def _no_prediction(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise _unsupported("prediction", "predicted outputs are not offered")
        return value

    @field_validator("web_search_options")
    @classmethod
    def _no_web_search(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise _unsupported("web_search_options", "kvproxy has no built-in tools")
        return value

    @property
    def output_format(self) -> OutputFormat | None:
        fmt = self.response_format
        if isinstance(fmt, JsonObjectFormat):
            return OutputFormat()
        if isinstance(fmt, JsonSchemaFormat):
            return OutputFormat(fmt.json_schema.schema_ or {})
        return None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def tool_plan(self, parallel_default: bool) -> ToolPlan | None:
        """What the request asks of function calling (None: no tools). ``parallel_default``: the
        format's default when ``parallel_tool_calls`` is unset (kvproxy.serving.embedded)."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        parsed = (
            ToolChoice("required", choice.function.name)
            if isinstance(choice, NamedToolChoice)
            else ToolChoice(choice)
        )
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools)
        parallel = self.parallel_tool_calls if self.parallel_tool_calls is not None else parallel_default
        return ToolPlan(tools, parsed, parallel)

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """None when no logprobs are wanted, else how many alternatives per position."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    )
    # OpenAI's default here is 16; kvproxy's one default output cap applies instead
    # (--max-tokens-default, kvproxy.serving.output_cap), as on every route and in both modes
    max_tokens: TokenLimit | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise _unsupported("echo", "prompt logprobs are not produced")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _unsupported("suffix", "insertion is not offered")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _unsupported("best_of > 1", "kvproxy returns one choice per request")
        return value


# ---- responses ---------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None  # required by OpenAI's spec, may be null


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # required by OpenAI's spec, may be null
    # a reasoning model's thinking, split from the content as llama-server splits it
    # (kvproxy.model.reasoning); absent for other models
    reasoning_content: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # absent when there are none

    @model_serializer(mode="wrap")
    def _drop_no_reasoning(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class _Envelope(BaseModel):
    """What every completion object and stream chunk starts with, in OpenAI's field order (a
    subclass's own ``object`` keeps this place)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ToolCallDelta(BaseModel):
    """A piece of a streamed call: the first carries its id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what a delta carries: {"role": ...} first, then {"content": ...}.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvproxy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
