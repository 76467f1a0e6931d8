"""Function calling in embedded mode on the bundled Gemma 3 270M, through the official openai client.

The bundled GGUF has no template: kvproxy renders its tool turns with its Gemma template with
Hermes-style ``<tool_call>`` calls (kvproxy.model.gemma_tools_template, the template the proxy's
llama-server gets): a required or named choice is forced by grammar, so the answer must be
a call of the function with arguments that match its schema (checked with jsonschema), streamed and
not. A tool result goes back through the history and the model answers in text.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import RunningServer
from tests.openai_spec import assert_valid

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture()
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=600)


def _turn_tokens(server: RunningServer, turn: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    m = re.search(rf'kvproxy_turn_token_kld_count{{[^}}]*turn="{turn}"[^}}]*}} (\S+)', text)
    assert m, text[:2000]
    return float(m.group(1))


def _check_call(name: str, arguments: str, tool: dict[str, Any]) -> dict[str, Any]:
    assert name == tool["function"]["name"]
    args = json.loads(arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_forced_call(client: openai.OpenAI, server: RunningServer, choice: Any) -> None:
    """A forced call, valid per OpenAI's spec and the function's schema; the turn is shadow-scored
    (forced by the header) and its tokens counted under ``turn="tool_call"``."""
    tools = [WEATHER] if choice == "required" else [TIME, WEATHER]
    before = {"tool_call": _turn_tokens(server, "tool_call")}
    raw = client.chat.completions.with_raw_response.create(
        model=server.model,
        messages=ASK,
        tools=tools,
        tool_choice=choice,
        temperature=0,
        max_tokens=200,
        extra_headers={"X-KVProxy-Shadow": "force"},
    )
    assert_valid("CreateChatCompletionResponse", raw.http_response.json())
    out = raw.parse()
    c = out.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None
    assert c.message.tool_calls and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    _check_call(call.function.name, call.function.arguments, WEATHER)
    assert out.usage is not None
    deadline = time.monotonic() + 300
    while _turn_tokens(server, "tool_call") < before["tool_call"] + out.usage.completion_tokens:
        assert time.monotonic() < deadline, "the tool turn was not scored"
        time.sleep(0.5)
    # (no check that the text series stood still: the session's server may still be scoring an
    # earlier module's text turns; counted under tool_call is what tells the turns apart)


def test_forced_call_streamed(client: openai.OpenAI, server: RunningServer) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    usage = None
    for chunk in stream:
        assert_valid("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["name"] += (d.function and d.function.name) or ""
                entry["arguments"] += (d.function and d.function.arguments) or ""
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    _check_call(calls[0]["name"], calls[0]["arguments"], WEATHER)
    assert usage is not None and usage.completion_tokens > 0
    # the same call as the answer that is not streamed (temperature 0)
    whole = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    first = whole.choices[0].message.tool_calls
    assert first is not None
    assert json.loads(first[0].function.arguments) == json.loads(calls[0]["arguments"])


def test_parallel_calls(client: openai.OpenAI, server: RunningServer) -> None:
    """``parallel_tool_calls``: several ``<tool_call>`` blocks, each its own id. Gemma 3 270M writes
    the calls asked for and then tends to repeat the last one until the limit: an answer cut inside
    a call is returned as text (finish_reason length), and its complete calls must be valid."""
    out = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Weather in Paris and the time in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=120,
    )
    c = out.choices[0]
    by_name = {"get_weather": WEATHER, "get_time": TIME}
    if c.finish_reason == "length":
        text = c.message.content
        assert c.message.tool_calls is None and text is not None
        assert text.startswith("<tool_call>\n"), text
        items = [json.loads(m) for m in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL)]
        assert len(items) >= 2, text  # the complete calls before the cut
        for item in items:
            _check_call(item["name"], json.dumps(item["arguments"]), by_name[item["name"]])
        return
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        _check_call(call.function.name, call.function.arguments, by_name[call.function.name])
    assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)


def test_round_trip_and_none(client: openai.OpenAI, server: RunningServer) -> None:
    """A call and its result in the history: the model answers in text (auto may answer with a
    response); ``none`` never calls."""
    first = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    auto = client.chat.completions.create(
        model=server.model, messages=history, tools=[WEATHER], temperature=0, max_tokens=100
    )
    a = auto.choices[0]
    if a.message.tool_calls:
        assert a.finish_reason == "tool_calls"
        _check_call(
            a.message.tool_calls[0].function.name, a.message.tool_calls[0].function.arguments, WEATHER
        )
    else:
        assert a.finish_reason in ("stop", "length") and a.message.content
    none = client.chat.completions.create(
        model=server.model,
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]},
            "tools",
        ),
    ],
)
def test_refused(client: openai.OpenAI, server: RunningServer, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=server.model, messages=ASK, max_tokens=5, **body)
    assert err.value.status_code == 400
    assert isinstance(err.value.body, dict) and err.value.body.get("param") == param, err.value.body
