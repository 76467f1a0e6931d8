"""Issue 19 on the real model (the session ``server``: ``kvproxy serve`` on Gemma 3 270M, q4_0 KV):
every object and every streamed chunk or event of the three generation routes validated against
OpenAI's published OpenAPI spec (tests/data), JSON output through llama.cpp grammars with logprobs
that stay those of the raw distribution, and the shadow path covering ``/v1/responses`` as it
covers chat (the per-token KLD, kept for the live page, and the metrics)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from kvproxy import sse
from tests.conftest import RunningServer
from tests.openai_spec import assert_valid, assert_valid_completion_chunk, assert_valid_event

FORCE_KEEP = {"X-KVProxy-Shadow": "force", "X-KVProxy-Token-Scores": "keep"}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        yield client


def stream(http: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> list[tuple[str | None, Any]]:
    with http.stream("POST", path, json={**body, "stream": True}, **kw) as resp:
        assert resp.status_code == 200, resp.read()
        raw = resp.read()
    decoder = sse.SSEDecoder()
    events = decoder.feed(raw) + decoder.close()
    return [(e.event, e.data if e.data == b"[DONE]" else orjson.loads(e.data or b"null")) for e in events]


def test_chat_objects_and_chunks_match_the_spec(http: httpx.Client, server: RunningServer) -> None:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = http.post("/v1/chat/completions", json=body).json()
    assert_valid("CreateChatCompletionResponse", out)
    assert (
        out["choices"][0]["message"]["refusal"] is None and out["choices"][0]["logprobs"]["refusal"] is None
    )
    events = stream(http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-1][1] == b"[DONE]"
    chunks = [data for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_objects_and_chunks_match_the_spec(http: httpx.Client, server: RunningServer) -> None:
    body = {"model": server.model, "prompt": "The sea is", "max_tokens": 5, "logprobs": 2}
    assert_valid("CreateCompletionResponse", http.post("/v1/completions", json=body).json())
    events = stream(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    chunks = [data for _, data in events[:-1]]
    for chunk in chunks:
        assert_valid_completion_chunk(chunk)
    assert len({c["id"] for c in chunks}) == 1  # one id a stream, as chat has (it was one a chunk)


def test_response_objects_and_events_match_the_spec(http: httpx.Client, server: RunningServer) -> None:
    body = {
        "model": server.model,
        "instructions": "Answer briefly.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        "max_output_tokens": 6,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        "temperature": 0,
    }
    out = http.post("/v1/responses", json=body).json()
    assert_valid("Response", out)
    text = out["output"][0]["content"][0]
    assert len(text["logprobs"]) == out["usage"]["output_tokens"] == 6
    assert all(len(lp["top_logprobs"]) == 2 for lp in text["logprobs"])
    events = stream(http, "/v1/responses", body)
    for name, data in events:
        assert name == data["type"]
        assert_valid_event(data)
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == text["text"]  # temperature 0: the same answer
    # a stream that ends by itself (the JSON schema's grammar ends it) ends in response.completed
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    events = stream(
        http, "/v1/responses", {"model": server.model, "input": "The capital of France", "text": fmt}
    )
    for _, data in events:
        assert_valid_event(data)
    assert events[-1][1]["type"] == "response.completed"
    assert json.loads(events[-1][1]["response"]["output"][0]["content"][0]["text"]).keys() == {"city"}


def test_json_output_keeps_the_raw_distribution(http: httpx.Client, server: RunningServer) -> None:
    """The grammar picks among the tokens; it does not change the distribution the logprobs (and the
    shadow path's KLD) are computed on: the first position's alternatives are the same with and
    without it, and may include tokens the grammar forbids."""
    base = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Give me a JSON object about Paris."}],
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    free = http.post("/v1/chat/completions", json=base).json()
    constrained = http.post("/v1/chat/completions", json={**base, "response_format": {"type": "json_object"}})
    assert constrained.status_code == 200, constrained.text
    got = constrained.json()["choices"][0]
    assert got["message"]["content"].lstrip().startswith("{")
    first_free = free["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    first_json = got["logprobs"]["content"][0]["top_logprobs"]
    assert first_json == first_free
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    out = http.post("/v1/chat/completions", json={**base, "max_tokens": 40, "response_format": schema}).json()
    assert out["choices"][0]["finish_reason"] == "stop"
    assert set(json.loads(out["choices"][0]["message"]["content"])) == {"city"}


def kept(http: httpx.Client, response_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = http.get(f"/kvproxy/v1/scores/{response_id}")
        assert r.status_code in (200, 202), r.text
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"no scores for {response_id}")


def scored_requests(http: httpx.Client, server: RunningServer) -> float:
    text = http.get("/metrics").text
    pattern = (
        rf'kvproxy_shadow_requests_total{{deployment="{re.escape(server.model)}",outcome="scored"}} (\S+)'
    )
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def test_responses_are_shadow_scored_like_chat(http: httpx.Client, server: RunningServer) -> None:
    before = scored_requests(http, server)
    body = {"model": server.model, "input": "Write about the sea.", "max_output_tokens": 8, "temperature": 0}
    out = http.post("/v1/responses", json=body, headers=FORCE_KEEP).json()
    got = kept(http, out["id"])
    assert got["status"] == "scored" and got["positions"] == out["usage"]["output_tokens"] == 8
    assert got["first_position"] == out["usage"]["input_tokens"]
    assert all(k >= 0 for k in got["kld"])
    events = stream(http, "/v1/responses", body, headers=FORCE_KEEP)
    streamed_id = events[0][1]["response"]["id"]  # filed under the id of the first event's response
    assert kept(http, streamed_id)["status"] == "scored"
    assert scored_requests(http, server) >= before + 2
    assert 'route="/v1/responses"' in http.get("/metrics").text
