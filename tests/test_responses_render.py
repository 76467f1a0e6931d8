"""The one Responses implementation (kvproxy.serving.responses_chat, responses_format) on chat
completions as llama-server's chat route and the embedded chat path produce them: tool calls become
``function_call`` items and argument events, a cut answer is ``incomplete`` with its reason, every
event is checked against OpenAI's spec; and the default output cap is said on every route. The same
against real servers and real clients: tests/test_client_matrix.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from kvproxy import sse
from kvproxy.protocol_responses import ResponsesRequest
from kvproxy.serving import responses_chat
from kvproxy.serving.output_cap import HEADER, applied_cap
from kvproxy.serving.responses_format import ResponsesRenderer, responses_usage
from tests.openai_spec import assert_valid, assert_valid_event
from tests.stub_backend import StubBackend
from tests.test_api_fast import Client, stub_and_dead_relay

TOOL = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
REQ = ResponsesRequest.model_validate(
    {"model": "m", "input": "Hi", "tools": [TOOL], "tool_choice": "required"}
)


def _call(i: int, **fn: str) -> dict[str, Any]:
    head = {"id": f"call_{i}", "type": "function"} if "name" in fn else {}
    return {"index": i, **head, "function": fn}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _events(raw: bytes) -> list[dict[str, Any]]:
    decoder = sse.SSEDecoder()
    return [orjson.loads(e.data) for e in decoder.feed(raw) + decoder.close() if e.data]


def test_a_chat_completion_with_tool_calls_is_a_response_with_function_call_items() -> None:
    data = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 12},
    }
    out = ResponsesRenderer(REQ, "m", 1024).from_chat(data).model_dump(mode="json")
    assert_valid("Response", out)
    assert out["status"] == "completed" and out["incomplete_details"] is None
    assert [(o["type"], o["call_id"], o["arguments"]) for o in out["output"]] == [
        ("function_call", "call_a", '{"city":"Oslo"}'),
        ("function_call", "call_b", '{"city":"Rome"}'),
    ]
    assert out["max_output_tokens"] == 1024 and out["tool_choice"] == "required"
    assert out["tools"][0]["name"] == "weather" and out["usage"]["total_tokens"] == 22


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_answer_is_incomplete_with_its_reason(finish: str, reason: str) -> None:
    data = {"choices": [{"message": {"content": "The sea"}, "finish_reason": finish}]}
    out = ResponsesRenderer(REQ, "m", 2).from_chat(data).model_dump(mode="json")
    assert_valid("Response", out)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": reason}
    assert out["output"][0]["status"] == "incomplete"


def test_a_streamed_tool_call_has_openai_events_in_order() -> None:
    """Text, then two calls whose arguments come in pieces (as llama-server streams them)."""
    r = ResponsesRenderer(REQ, "m", 64)
    raw = r.start()
    raw += r.chunk(_chunk({"role": "assistant", "content": "Let me look."}))
    raw += r.chunk(_chunk({"tool_calls": [_call(0, name="weather", arguments="")]}))
    raw += r.chunk(_chunk({"tool_calls": [_call(0, arguments='{"city":')]}))
    raw += r.chunk(_chunk({"tool_calls": [_call(0, arguments='"Oslo"}')]}))
    raw += r.chunk(_chunk({"tool_calls": [_call(1, name="weather", arguments='{"city":"Rome"}')]}))
    raw += r.chunk(_chunk({}, "tool_calls"))
    raw += r.finish(responses_usage(3, 9))
    got = _events(raw)
    for event in got:
        assert_valid_event(event)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    call = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["type"] for e in got] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *call,
        *[c for c in call if c != "response.function_call_arguments.delta"][:1],
        "response.function_call_arguments.delta",
        *call[3:],
        "response.completed",
    ]
    done = [e for e in got if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["name"], e["arguments"]) for e in done] == [
        (1, "weather", '{"city":"Oslo"}'),
        (2, "weather", '{"city":"Rome"}'),
    ]
    final = got[-1]["response"]
    assert_valid("Response", final)
    assert [o["type"] for o in final["output"]] == ["message", "function_call", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me look."
    added = [e for e in got if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2]


def test_function_call_items_become_assistant_tool_calls_and_tool_messages() -> None:
    body = {
        "model": "m",
        "instructions": "Use tools.",
        "input": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "type": "function_call",
                "call_id": "call_a",
                "name": "weather",
                "arguments": '{"city":"Oslo"}',
                "id": "fc_1",
                "status": "completed",
            },
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "weather"},
        "max_output_tokens": None,
        "parallel_tool_calls": False,
    }
    messages = responses_chat.translatable(body)
    assert messages == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    ]
    chat = responses_chat.chat_body(body, messages, 1024)
    assert chat["tools"] == [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["max_tokens"] == 1024 and chat["parallel_tool_calls"] is False
    assert "input" not in chat and "max_output_tokens" not in chat
    ResponsesRequest.model_validate(body)  # kvproxy's own model takes all of it


def test_the_output_cap_is_the_requests_own_else_the_default() -> None:
    assert applied_cap("chat", {"max_tokens": 5}, 1024) == 5
    assert applied_cap("chat", {"max_tokens": 5, "max_completion_tokens": 7}, 1024) == 7
    assert applied_cap("completions", {"max_tokens": None}, 1024) == 1024
    assert applied_cap("responses", {"max_output_tokens": None}, 1024) == 1024
    assert applied_cap("responses", {}, 0) is None


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with stub_and_dead_relay(StubBackend(), max_tokens_default=3) as c:
        yield c
    c.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": None}),
    ],
)
def test_every_route_has_one_default_cap_and_says_it(client: Client, path: str, body: dict[str, Any]) -> None:
    resp = client.post(path, json={"model": "stub", **body})
    assert resp.status_code == 200, resp.text
    assert resp.headers[HEADER] == "3"
    out = resp.json()
    used = out["usage"]["output_tokens" if path.endswith("responses") else "completion_tokens"]
    assert used == 3  # the stub never stops by itself: the default cap (not 16, not the context) cut it
    if path.endswith("responses"):
        assert out["max_output_tokens"] == 3 and out["status"] == "incomplete"
    explicit = client.post(
        path,
        json={
            "model": "stub",
            **body,
            "max_output_tokens" if path.endswith("responses") else "max_tokens": 2,
        },
    )
    assert explicit.headers[HEADER] == "2"
