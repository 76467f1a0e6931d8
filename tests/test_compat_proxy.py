"""Issue 19 in proxy mode, in front of real llama-server processes (the pinned llama.cpp) on Gemma 3
270M: ``/v1/responses`` served through the primary's chat route (the same conversion llama-server
applies itself, so the same tokens) and shadow-scored like chat; requests only llama-server's own
``/v1/responses`` takes (tools) relayed to it as they are; ``/v1/embeddings`` relayed to an
embeddings llama-server; ``--max-tokens-default`` applied to requests that set no limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from kvproxy import sse
from kvproxy.model.gemma_tools_template import GEMMA_TOOLS_TEMPLATE
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import LlamaServer, llama_servers
from tests.openai_spec import assert_valid, assert_valid_event

FORCE_KEEP = {"X-KVProxy-Shadow": "force", "X-KVProxy-Token-Scores": "keep"}
LIMIT = 8  # the proxy's --max-tokens-default


@pytest.fixture(scope="module")
def stack(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compat-proxy")
    template = tmp / "gemma.jinja"
    template.write_text(GEMMA_TOOLS_TEMPLATE)  # Gemma turns; tools llama-server parses
    # Jinja on (the helper turns it off for the built-in format): tools need it
    tpl = ("--jinja", "--chat-template-file", str(template))
    with llama_servers(
        gemma_path,
        tmp,
        ("-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-np", "1", *tpl),
        ("-fa", "on", "-np", "1", "--swa-full", *tpl),
        ("--embeddings", "--pooling", "mean", "-np", "1"),
    ) as (q4, f16, embed):
        config = tmp / "deployments.toml"
        config.write_text(f"""
[[deployments]]
model = "gemma"
shadow_rate = 0
primary_logprobs = true
primary = {{ urls = ["{q4.url}"], cache_type_k = "q4_0", cache_type_v = "q4_0" }}
reference = {{ urls = ["{f16.url}"] }}

[[deployments]]
model = "embed"
shadow_rate = 0
primary = {{ urls = ["{embed.url}"] }}
""")
        proxy = start_server("--config", str(config), "--max-tokens-default", str(LIMIT))
        try:
            yield {"proxy": proxy, "q4": q4}
        finally:
            stop_server(proxy)


@pytest.fixture()
def http(stack: dict[str, Any]) -> Iterator[httpx.Client]:
    proxy: RunningServer = stack["proxy"]
    with httpx.Client(base_url=proxy.base_url, timeout=300) as client:
        yield client


def events(resp: httpx.Response) -> list[dict[str, Any]]:
    decoder = sse.SSEDecoder()
    parsed = decoder.feed(resp.read()) + decoder.close()
    return [orjson.loads(e.data) for e in parsed if e.data and e.data != b"[DONE]"]


def test_a_response_is_served_through_the_chat_route(http: httpx.Client, stack: dict[str, Any]) -> None:
    body = {
        "model": "gemma",
        "instructions": "Answer briefly.",
        "input": [{"role": "user", "content": "Write about the sea."}],
        "max_output_tokens": 6,
        "temperature": 0,
    }
    out = http.post("/v1/responses", json={**body, "include": ["message.output_text.logprobs"]}).json()
    assert_valid("Response", out)
    assert out["usage"]["output_tokens"] == 6 and out["status"] == "incomplete"
    assert len(out["output"][0]["content"][0]["logprobs"]) == 6
    # the same tokens as llama-server's own /v1/responses (which converts to its chat route too)
    q4: LlamaServer = stack["q4"]
    own = httpx.post(f"{q4.url}/v1/responses", json=body, timeout=300).json()
    assert out["output"][0]["content"][0]["text"] == own["output"][0]["content"][0]["text"]
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        got = events(resp)
    for event in got:
        assert_valid_event(event)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert got[-1]["type"] == "response.incomplete"
    assert got[-1]["response"]["output"][0]["content"][0]["text"] == own["output"][0]["content"][0]["text"]


def kept(http: httpx.Client, response_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = http.get(f"/kvproxy/v1/scores/{response_id}")
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        assert r.status_code == 202, r.text
        time.sleep(0.3)
    raise AssertionError(f"no scores for {response_id}")


def test_a_relayed_response_is_shadow_scored(http: httpx.Client) -> None:
    body = {"model": "gemma", "input": "Write about the sea.", "max_output_tokens": 5, "temperature": 0}
    out = http.post("/v1/responses", json=body, headers=FORCE_KEEP).json()
    assert out["output"][0]["content"][0]["logprobs"] == []  # asked for by kvproxy, not by the client
    got = kept(http, out["id"])
    assert got["status"] == "scored" and got["positions"] == 5
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}, headers=FORCE_KEEP) as resp:
        streamed = events(resp)
    assert all(not e.get("logprobs") for e in streamed)
    assert kept(http, streamed[0]["response"]["id"])["status"] == "scored"


def test_tools_are_served_through_the_chat_route_too(http: httpx.Client, stack: dict[str, Any]) -> None:
    """Tools and function-call items go through the primary's chat route like any Responses request
    (not llama-server's own /v1/responses, whose events had no sequence_number or output_index)."""
    tool = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
    given = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"}
    history = [
        {"role": "user", "content": "Hi"},
        given,
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    body = {"model": "gemma", "input": history, "tools": [tool], "max_output_tokens": 4, "temperature": 0}
    out = http.post("/v1/responses", json=body)
    assert out.status_code == 200, out.text
    assert_valid("Response", out.json())
    assert out.json()["parallel_tool_calls"] is True and out.json()["tools"][0]["name"] == "weather"
    # the tokens are those of the same chat completion, tool messages included
    q4: LlamaServer = stack["q4"]
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    chat = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": tool["parameters"]}}],
        "max_tokens": 4,
        "temperature": 0,
    }
    own = httpx.post(f"{q4.url}/v1/chat/completions", json=chat, timeout=300).json()
    assert out.json()["usage"]["input_tokens"] == own["usage"]["prompt_tokens"]
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as resp:
        got = events(resp)
    for event in got:
        assert_valid_event(event)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert got[-1]["type"] in ("response.completed", "response.incomplete")


def test_embeddings_and_other_routes_are_relayed(http: httpx.Client) -> None:
    for path in ("/v1/embeddings", "/embeddings"):
        out = http.post(path, json={"model": "embed", "input": ["hello", "world"]})
        assert out.status_code == 200, out.text
        assert len(out.json()["data"]) == 2
    assert_valid(
        "CreateEmbeddingResponse", http.post("/v1/embeddings", json={"model": "embed", "input": "hi"}).json()
    )
    # a route llama-server has and kvproxy does not serve itself, relayed by the deployment's model
    tokens = http.post(
        "/v1/chat/completions/input_tokens",
        json={"model": "gemma", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert tokens.status_code == 200, tokens.text


def test_the_default_limit_applies_in_proxy_mode(http: httpx.Client) -> None:
    chat = http.post(
        "/v1/chat/completions", json={"model": "gemma", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= LIMIT
    alias = http.post("/completions", json={"model": "gemma", "prompt": "The sea", "max_tokens": None})
    assert alias.status_code == 200 and alias.json()["usage"]["completion_tokens"] <= LIMIT
    assert http.get("/models").json()["data"][0]["id"] == "gemma"
    assert http.get("/v1/models/embed").json()["id"] == "embed"


def test_answers_name_the_model_as_asked_and_a_real_fingerprint(stack: dict[str, Any]) -> None:
    """Issue 28 item 4: llama-server answers with its GGUF path as ``model`` and ``b0-unknown``-like
    fingerprints of its own; the client sees its deployment name and kvproxy's fingerprint (the
    primary's /props build_info, then its KV types), on every route, streamed or not."""
    proxy = stack["proxy"]
    build = orjson.loads(httpx.get(f"{stack['q4'].url}/props", timeout=10).content).get("build_info")
    fingerprint = f"{build or 'unknown'}-q4_0-q4_0"
    msg = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=proxy.base_url, timeout=120) as http:
        for path, body in (
            ("/v1/chat/completions", {"messages": msg}),
            ("/v1/completions", {"prompt": "Hi"}),
        ):
            out = http.post(path, json={"model": "gemma", "max_tokens": 3, **body}).json()
            assert out["model"] == "gemma" and out["system_fingerprint"] == fingerprint, out
            resp = http.post(path, json={"model": "gemma", "max_tokens": 3, "stream": True, **body})
            decoder = sse.SSEDecoder()
            chunks = [
                orjson.loads(e.data) for e in decoder.feed(resp.content) if e.data and e.data != b"[DONE]"
            ]
            assert chunks and all(c["model"] == "gemma" for c in chunks), chunks
            assert all(c.get("system_fingerprint", fingerprint) == fingerprint for c in chunks)
        out = http.post(
            "/v1/responses", json={"model": "gemma", "input": "Hi", "max_output_tokens": 3}
        ).json()
        assert out.get("model") == "gemma", out
