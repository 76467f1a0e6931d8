"""Issue 19 in process (the real app over ``httpx.ASGITransport``, a stub backend): the Responses API's
shapes and refusals, JSON output routing, CORS, the unprefixed aliases, ``/v1/models/{id}``, the
default completion limit, OpenAI parameters accepted or refused by name, and every answer checked
against OpenAI's published OpenAPI spec (tests/openai_spec.py). What needs the model is in
tests/test_compat_model.py; real clients are in tests/test_clients.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from kvproxy import sse
from kvproxy.app import create_app
from kvproxy.backends.grammar import json_gbnf
from kvproxy.config import DEFAULT_MAX_TOKENS
from tests.openai_spec import assert_valid, assert_valid_completion_chunk, assert_valid_event
from tests.stub_backend import StubBackend
from tests.test_api_fast import MSG, Client, stub_and_dead_relay, stub_deployment
from tests.test_errors import assert_openai_error

ORIGIN = "http://app.example:5173"


@pytest.fixture(scope="module")
def backend() -> StubBackend:
    return StubBackend()


@pytest.fixture(scope="module")
def client(backend: StubBackend) -> Iterator[Client]:
    with stub_and_dead_relay(backend, cors_origins=[ORIGIN], api_keys=["k"]) as c:
        c.http.headers["Authorization"] = "Bearer k"
        yield c
    c.close()


def events(resp: Any) -> list[tuple[str | None, dict[str, Any]]]:
    decoder = sse.SSEDecoder()
    parsed = decoder.feed(resp.content) + decoder.close()
    return [(e.event, orjson.loads(e.data)) for e in parsed if e.data and e.data != b"[DONE]"]


# ---- /v1/responses ---------------------------------------------------------------------------


def test_a_response_has_openai_shape(client: Client, backend: StubBackend) -> None:
    body = {"model": "stub", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 2}
    resp = client.post("/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert_valid("Response", out)
    assert out["object"] == "response" and out["id"].startswith("resp_")
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["content"][0]["text"] == "ab"
    assert out["usage"]["output_tokens"] == 2 and out["store"] is False
    assert out["instructions"] == "Be brief." and out["max_output_tokens"] == 2
    prompt = bytes(t - 2 for t in backend.generated[-1].prompt_tokens[1:]).decode()
    assert "Be brief." in prompt and "Hi" in prompt  # instructions become the system turn


def test_a_streamed_response_has_its_events_in_order(client: Client) -> None:
    body = {
        "model": "stub",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "stream": True,
        "store": False,
    }
    resp = client.post("/v1/responses", json=body)
    assert resp.status_code == 200, resp.text
    got = events(resp)
    kinds = [data["type"] for _, data in got]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # the stub stops at its length: "length"
    ]
    assert [data["sequence_number"] for _, data in got] == list(range(len(got)))
    for name, data in got:
        assert name == data["type"]  # the event: line names the event
        assert_valid_event(data)
    assert got[-1][1]["response"]["output"][0]["content"][0]["text"] == "abc"
    assert not resp.content.rstrip().endswith(b"[DONE]")


def test_json_output_on_a_response(client: Client, backend: StubBackend) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "name": "city", "schema": schema, "strict": True}
    resp = client.post("/v1/responses", json={"model": "stub", "input": "Hi", "text": {"format": fmt}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"][0]["content"][0]["text"] == "{}"
    assert resp.json()["text"]["format"]["name"] == "city"
    assert "city" in (backend.generated[-1].grammar or "")
    assert_valid("Response", resp.json())


@pytest.mark.parametrize(
    ("extra", "param", "contains"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
        ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
        ({"background": True}, "background", "keeps no responses"),
        ({"tools": [{"type": "web_search"}]}, "tools", "built-in tool 'web_search'"),
        ({"tools": [{"type": "custom", "name": "f"}]}, "tools", "only function tools"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort", "does not reason"),
        ({"text": {"verbosity": "high"}}, "text.verbosity", "verbosity"),
        (
            {"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}},
            "text.format.name",
            "",
        ),
        ({"truncation": "auto"}, "truncation", "never truncated"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
        ({"top_logprobs": 21}, "top_logprobs", "20"),
        ({"input": []}, "input", "at least 1"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "keeps no responses"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}
                ]
            },
            "input",
            "image input is not supported",
        ),
    ],
)
def test_what_a_response_cannot_honour_is_a_400_naming_it(
    client: Client, extra: dict[str, Any], param: str, contains: str
) -> None:
    resp = client.post("/v1/responses", json={"model": "stub", "input": "Hi", **extra})
    assert_openai_error(resp, 400, param=param, contains=contains)


@pytest.mark.parametrize("model", ["stub", "relay"])
def test_a_responses_content_part_without_type_is_a_400(client: Client, model: str) -> None:
    """OpenAI answers a part without ``type`` with a 400; embedded took it as text, and the relay
    sent it on to llama-server's own route (here: a dead upstream, so a 502 means it was relayed)."""
    for part in ({"text": "Hi"}, {"type": None, "text": "Hi"}):
        content = [{"type": "input_text", "text": "Hello"}, part]
        body = {"model": model, "input": [{"role": "user", "content": content}]}
        resp = client.post("/v1/responses", json=body)
        assert_openai_error(resp, 400, contains="content[1].type")


def test_stored_responses_are_refused_by_name(client: Client) -> None:
    for method, path in (
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("GET", "/v1/responses/resp_1/input_items"),
    ):
        assert_openai_error(client.request(method, path), 400, contains="Stored responses are not supported")


# ---- chat and completions ----------------------------------------------------------------------


def test_chat_objects_carry_refusal_and_validate(client: Client) -> None:
    body = {"model": "stub", "messages": MSG, "logprobs": True}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["choices"][0]["message"]["refusal"] is None
    assert out["choices"][0]["logprobs"]["refusal"] is None
    assert_valid("CreateChatCompletionResponse", out)
    stream = client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [data for _, data in events(stream)]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert len({c["id"] for c in chunks}) == 1


def test_a_completion_stream_keeps_one_id(client: Client) -> None:
    body = {"model": "stub", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    chunks = [data for _, data in events(client.post("/v1/completions", json=body))]
    assert len(chunks) >= 4 and len({c["id"] for c in chunks}) == 1
    for chunk in chunks:
        assert_valid_completion_chunk(chunk)
    assert_valid(
        "CreateCompletionResponse",
        client.post("/v1/completions", json={**body, "stream": False, "stream_options": None}).json(),
    )


def test_json_output_on_chat(client: Client, backend: StubBackend) -> None:
    for fmt in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ):
        resp = client.post(
            "/v1/chat/completions", json={"model": "stub", "messages": MSG, "response_format": fmt}
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "{}"
        assert backend.generated[-1].grammar
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}},
    }
    resp = client.post(
        "/v1/chat/completions", json={"model": "stub", "messages": MSG, "response_format": bad}
    )
    assert_openai_error(resp, 400, param="response_format.json_schema.schema", contains="grammar")


def test_json_strings_hold_no_raw_control_characters() -> None:
    """llama-cpp-python's converter lets a string hold a raw newline (not JSON); the grammar kvproxy
    builds uses llama.cpp's own string characters, as its json_object grammar does."""
    grammar = json_gbnf({"type": "object", "properties": {"a": {"type": "string"}}})
    assert r'char ::= [^"\\\x7F\x00-\x1F] |' in grammar and r'char ::= [^"\\] |' not in grammar
    assert r'[^"\\\x7F\x00-\x1F]' in json_gbnf(None)


def test_known_parameters_that_change_nothing_are_accepted(client: Client) -> None:
    ignored = {
        "user": "u",
        "metadata": {"a": "b"},
        "store": True,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "safety_identifier": "s",
        "parallel_tool_calls": False,
        "reasoning_effort": "none",
        "verbosity": "medium",
        "modalities": ["text"],
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    resp = client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, **ignored})
    assert resp.status_code == 200, resp.text
    ignored.pop("reasoning_effort"), ignored.pop("verbosity"), ignored.pop("modalities"), ignored.pop("store")
    ignored["stream_options"] = {"include_obfuscation": False}
    resp = client.post("/v1/responses", json={"model": "stub", "input": "Hi", "store": True, **ignored})
    assert resp.status_code == 200, resp.text


def test_image_parts_get_a_clear_400(client: Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    resp = client.post("/v1/chat/completions", json={"model": "stub", "messages": messages})
    assert_openai_error(resp, 400, param="messages.0.content", contains="image input is not supported")


def test_a_request_without_a_limit_gets_the_default(backend: StubBackend) -> None:
    c = Client(create_app(stub_deployment(backend), max_tokens_default=5))
    try:
        c.post("/v1/chat/completions", json={"model": "stub", "messages": MSG})
        assert backend.generated[-1].max_tokens == 5
        c.post("/v1/responses", json={"model": "stub", "input": "Hi"})
        assert backend.generated[-1].max_tokens == 5
        c.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "max_completion_tokens": 9})
        assert backend.generated[-1].max_tokens == 9
    finally:
        c.close()
    assert DEFAULT_MAX_TOKENS == 1024


def test_the_default_limit_never_exceeds_the_context(client: Client, backend: StubBackend) -> None:
    client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG})
    gen = backend.generated[-1]
    assert gen.max_tokens == backend.n_ctx - len(gen.prompt_tokens) < DEFAULT_MAX_TOKENS


# ---- routes ----------------------------------------------------------------------------------


def test_unprefixed_aliases_and_model_retrieval(client: Client) -> None:
    for path, body in (
        ("/chat/completions", {"messages": MSG}),
        ("/completions", {"prompt": "x"}),
        ("/responses", {"input": "x"}),
    ):
        resp = client.post(
            path,
            json={"model": "stub", "max_tokens": 1, **body}
            if "input" not in body
            else {"model": "stub", **body},
        )
        assert resp.status_code == 200, (path, resp.text)
    listed = client.get("/models").json()
    assert_valid("ListModelsResponse", listed)
    assert [m["id"] for m in listed["data"]] == ["stub", "relay"]
    card = client.get("/v1/models/stub").json()
    assert_valid("Model", card)
    assert card["id"] == "stub" and client.get("/models/relay").json()["id"] == "relay"
    assert_openai_error(client.get("/v1/models/gpt-5"), 404, code="model_not_found", contains="gpt-5")


def test_every_unknown_route_is_named_in_its_404(client: Client) -> None:
    assert_openai_error(client.get("/v1/nothing"), 404, contains="GET /v1/nothing")
    assert_openai_error(client.post("/v1/nothing", content=b"x"), 404, contains="POST /v1/nothing")
    assert_openai_error(client.post("/v1/nothing", json={"a": 1}), 404, contains="POST /v1/nothing")
    assert_openai_error(client.get("/elsewhere"), 404, contains="GET /elsewhere")
    assert_openai_error(client.get("/v1/responses"), 405)


def test_embeddings_are_refused_by_the_embedded_backend_and_relayed_in_proxy_mode(client: Client) -> None:
    for path in ("/v1/embeddings", "/embeddings"):
        resp = client.post(path, json={"model": "stub", "input": ["hi"]})
        err = assert_openai_error(resp, 404, contains="generation only")
        assert path in err["message"]
    # the relay deployment's llama-server is down: the request did go there
    assert_openai_error(client.post("/v1/embeddings", json={"model": "relay", "input": ["hi"]}), 502)
    assert_openai_error(client.post("/v1/rerank", json={"model": "relay", "query": "q"}), 502)
    assert_openai_error(
        client.post("/v1/rerank", json={"model": "stub", "query": "q"}), 404, contains="/v1/rerank"
    )


def test_aliases_need_the_api_key(client: Client) -> None:
    for method, path in (("POST", "/chat/completions"), ("GET", "/models"), ("POST", "/responses")):
        resp = client.request(method, path, json={}, headers={"Authorization": ""})
        assert_openai_error(resp, 401, code="missing_api_key")


# ---- CORS --------------------------------------------------------------------------------------


def preflight(client: Client, path: str, origin: str = ORIGIN) -> Any:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        "Authorization": "",
    }
    return client.request("OPTIONS", path, headers=headers)


def test_a_cors_preflight_is_answered_for_the_serving_routes(client: Client) -> None:
    for path in ("/v1/chat/completions", "/v1/responses", "/chat/completions", "/v1/models"):
        resp = preflight(client, path)
        assert resp.status_code == 204, (path, resp.text)
        assert resp.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in resp.headers["access-control-allow-methods"]
        assert resp.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
        assert "Origin" in resp.headers["vary"]
    body = {"model": "stub", "messages": MSG, "max_tokens": 1}
    resp = client.post("/v1/chat/completions", json=body, headers={"Origin": ORIGIN})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ORIGIN
    # an error is readable by the page too (the key is checked after the preflight)
    resp = client.post("/v1/chat/completions", json=body, headers={"Origin": ORIGIN, "Authorization": ""})
    assert resp.status_code == 401 and resp.headers["access-control-allow-origin"] == ORIGIN


def test_cors_never_opens_the_admin_routes_nor_other_origins(client: Client) -> None:
    for path in ("/kvproxy/v1/status", "/kvproxy/v1/history", "/metrics"):
        resp = preflight(client, path)
        assert resp.status_code != 204 and "access-control-allow-origin" not in resp.headers
    resp = client.get("/metrics", headers={"Origin": ORIGIN})
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
    resp = preflight(client, "/v1/chat/completions", origin="http://evil.example")
    assert resp.status_code != 204 and "access-control-allow-origin" not in resp.headers


def test_cors_is_off_by_default(backend: StubBackend) -> None:
    c = Client(create_app(stub_deployment(backend)))
    try:
        resp = preflight(c, "/v1/chat/completions")
        assert resp.status_code == 405 and "access-control-allow-origin" not in resp.headers
    finally:
        c.close()


def test_a_guarded_deployment_serves_responses_from_its_fallback_in_drift() -> None:
    import time as _time

    from kvproxy.backends.base import KVConfig
    from kvproxy.config import KVCacheType
    from kvproxy.deployments.base import ShadowOptions
    from kvproxy.deployments.embedded import EmbeddedDeployment
    from kvproxy.shadow.guard import Guard
    from kvproxy.shadow.pool import ShadowSampler
    from tests.stub_backend import IdleScorer

    primary, fallback = StubBackend("a"), StubBackend("b")
    guard = Guard(fallback="b", active=True, since=_time.monotonic())  # in drift, held
    guarded = EmbeddedDeployment(
        primary,  # type: ignore[arg-type]
        IdleScorer(),  # type: ignore[arg-type]
        reference_kv=KVConfig(KVCacheType.F16, KVCacheType.F16),
        shadow=ShadowOptions(ShadowSampler(0.0)),
        guard=guard,
    )
    c = Client(create_app([guarded, stub_deployment(fallback)]))
    try:
        resp = c.post("/v1/responses", json={"model": "a", "input": "Hi"})
        assert resp.status_code == 200 and resp.headers["x-kvproxy-served-by"] == "b"
        assert resp.json()["model"] == "b" and fallback.generated and not primary.generated
        guard.active = False
        resp = c.post("/responses", json={"model": "a", "input": "Hi"})
        assert resp.headers["x-kvproxy-served-by"] == "a" and primary.generated
    finally:
        c.close()


# ---- sampling parameters out of OpenAI's ranges (issue 28, item 7) ---------------------------

OUT_OF_RANGE = [
    ("temperature", 7, "decimal_above_max_value"),
    ("temperature", -0.5, "decimal_below_min_value"),
    ("top_p", 1.5, "decimal_above_max_value"),
    ("presence_penalty", 2.5, "decimal_above_max_value"),
    ("frequency_penalty", -3, "decimal_below_min_value"),
    ("n", 0, "integer_below_min_value"),
    ("max_tokens", 0, "integer_below_min_value"),
    ("max_completion_tokens", 0, "integer_below_min_value"),
    ("top_logprobs", 21, "integer_above_max_value"),
]


@pytest.mark.parametrize("model", ["relay", "stub"])
@pytest.mark.parametrize(("param", "value", "code"), OUT_OF_RANGE)
def test_sampling_parameters_out_of_range_are_a_400_naming_them(
    client: Client, model: str, param: str, value: float, code: str
) -> None:
    """As OpenAI answers them, in both modes, before anything is forwarded: the relay's llama-server
    is down here, so a 502 would mean the request went on."""
    body = {"model": model, "messages": MSG, param: value}
    if param == "top_logprobs":
        body["logprobs"] = True
    err = assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param)
    assert err["code"] == code and param in err["message"]
    if param in ("max_completion_tokens", "top_logprobs"):
        return
    body = {"model": model, "prompt": "x", param: value}
    assert_openai_error(client.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("model", ["relay", "stub"])
def test_responses_sampling_parameters_out_of_range_are_a_400(client: Client, model: str) -> None:
    for param, value in (("temperature", 2.5), ("top_p", -1), ("max_output_tokens", 0), ("top_logprobs", 30)):
        body = {"model": model, "input": "Hi", param: value}
        assert_openai_error(client.post("/v1/responses", json=body), 400, param=param)


def test_sampling_parameters_in_range_are_forwarded(client: Client) -> None:
    """The edges are valid: the request reaches the (dead) upstream."""
    body = {"model": "relay", "messages": MSG, "temperature": 2, "top_p": 0, "presence_penalty": -2, "n": 1}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 502)
