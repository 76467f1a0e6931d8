"""Routing, validation and error mapping, in process: the real app (fast path, FastAPI routes,
access and body layers) over ``httpx.ASGITransport``, with a stub backend instead of a model
(tests/stub_backend.py). The real-model and real-process tests (test_errors.py, test_openai_client.py,
...) stay; these cover the many refusals that never reach a backend, in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from kvproxy.app import create_app
from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType
from kvproxy.deployments.base import ShadowOptions
from kvproxy.deployments.build import http_deployment
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.deployments.spec import DeploymentSpec
from kvproxy.shadow.pool import ShadowSampler
from tests.error_cases import MSG, SCHEMA_VIOLATIONS, UNHONOURED
from tests.llama_servers import free_port
from tests.stub_backend import IdleScorer, StubBackend
from tests.test_errors import assert_openai_error


def stub_deployment(backend: StubBackend) -> EmbeddedDeployment:
    return EmbeddedDeployment(
        backend,  # type: ignore[arg-type]
        IdleScorer(),  # type: ignore[arg-type]
        reference_kv=KVConfig(KVCacheType.F16, KVCacheType.F16),
        shadow=ShadowOptions(ShadowSampler(0.0)),
    )


class Client:
    """Synchronous calls into the ASGI app on one private event loop."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvproxy")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kwargs))

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def backend() -> StubBackend:
    return StubBackend()


@contextlib.contextmanager
def stub_and_dead_relay(backend: StubBackend, **app_options: Any) -> Iterator[Client]:
    """The app over the stub deployment and an HTTP deployment whose llama-server is down."""
    dead = f"http://127.0.0.1:{free_port()}"
    relay = http_deployment(DeploymentSpec.model_validate({"model": "relay", "primary": {"urls": [dead]}}))
    c = Client(create_app([stub_deployment(backend), relay], **app_options))
    yield c
    c.loop.run_until_complete(relay.primary_pool.close())


@pytest.fixture(scope="module")
def client(backend: StubBackend) -> Iterator[Client]:
    with stub_and_dead_relay(backend) as c:
        yield c
    c.close()


def test_a_request_reaches_the_backend_of_its_model(client: Client, backend: StubBackend) -> None:
    before = len(backend.generated)
    resp = client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "ab"
    assert len(backend.generated) == before + 1
    assert backend.generated[-1].max_tokens == 2
    relay = client.post("/v1/chat/completions", json={"model": "relay", "messages": MSG})
    assert_openai_error(relay, 502, code="upstream_unavailable")  # routed to the HTTP deployment
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["stub", "relay"]


def test_unknown_model_invalid_json_and_unknown_routes(client: Client) -> None:
    for path, body in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "x"})):
        resp = client.post(path, json={"model": "gpt-5", **body})
        assert_openai_error(resp, 404, param="model", code="model_not_found", contains="gpt-5")
    bad = client.post("/v1/chat/completions", content=b'{"model": "x", "messages": [')
    assert_openai_error(bad, 400, code="invalid_json", contains="JSON")
    assert client.post("/v1/chat/completions", content=b"[1, 2]").status_code == 400
    assert_openai_error(client.get("/v1/nothing"), 404, contains="GET /v1/nothing")
    assert_openai_error(client.get("/v1/chat/completions"), 405)


@pytest.mark.parametrize(("body", "param", "contains"), SCHEMA_VIOLATIONS)
def test_schema_violations_are_400(client: Client, body: dict[str, Any], param: str, contains: str) -> None:
    body = {k: v for k, v in {"model": "stub", **body}.items() if v is not None}  # None: left out
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param, contains=contains)


@pytest.mark.parametrize(("extra", "param", "contains"), UNHONOURED)
def test_parameters_that_cannot_be_honoured_are_400(
    client: Client, extra: dict[str, Any], param: str | None, contains: str
) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, **extra})
    assert_openai_error(resp, 400, param=param, contains=contains)


def test_completion_parameters_that_cannot_be_honoured(client: Client) -> None:
    for extra, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix")):
        resp = client.post("/v1/completions", json={"model": "stub", "prompt": "x", **extra})
        assert_openai_error(resp, 400, param=param, contains="not supported")


def test_headers_are_checked(client: Client) -> None:
    body = {"model": "stub", "messages": MSG}
    bad = client.post("/v1/chat/completions", json=body, headers={"X-KVProxy-Shadow": "always"})
    assert_openai_error(bad, 400, param="X-KVProxy-Shadow", contains="force")
    bad = client.post("/v1/chat/completions", json=body, headers={"X-KVProxy-Token-Scores": "yes"})
    assert_openai_error(bad, 400, param="X-KVProxy-Token-Scores", contains="keep")


def test_context_overflow_is_refused_before_tokenizing(client: Client, backend: StubBackend) -> None:
    """The stub's tokens are bytes: a prompt of more bytes than the context never gets tokenized."""
    before = len(backend.generated)
    long = [{"role": "user", "content": "x" * 1000}]
    err = assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "stub", "messages": long}),
        400,
        code="context_length_exceeded",
        contains="at least",
    )
    assert "256" in err["message"]
    err = assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "max_tokens": 250}),
        400,
        param="max_tokens",
        code="context_length_exceeded",
    )
    assert "250 for the completion" in err["message"]
    assert len(backend.generated) == before


def test_the_openapi_document_builds_without_warnings(backend: StubBackend) -> None:
    """One route table for generation (kvproxy.api.openai.GENERATION): each operation id once (a
    GET and a DELETE on one function once shared one, and FastAPI warned), every route documented."""
    app = create_app(stub_deployment(backend))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = app.openapi()
    ids = [op["operationId"] for methods in schema["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].startswith("#/components/schemas/")
    assert "/chat/completions" not in schema["paths"]  # the aliases are served, not documented


def test_a_failing_backend_is_a_500_before_any_stream_starts() -> None:
    c = Client(create_app(stub_deployment(StubBackend(fail=True))))
    try:
        for stream in (False, True):
            resp = c.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "stream": stream})
            assert_openai_error(resp, 500, code="backend_error")
    finally:
        c.close()


# ---- x-request-id (issue 28, item 6) ----------------------------------------------------------


def test_every_answer_carries_an_x_request_id(client: Client) -> None:
    answers = [
        client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "max_tokens": 2}),
        client.post("/v1/chat/completions", json={"model": "stub", "messages": MSG, "stream": True}),
        client.post("/v1/chat/completions", json={"model": "relay", "messages": MSG}),  # 502
        client.post("/v1/chat/completions", json={"model": "nope", "messages": MSG}),  # 404
        client.post("/v1/completions", json={"model": "stub", "prompt": "x", "temperature": 9}),  # 400
        client.get("/v1/models"),
        client.get("/health"),
        client.get("/no/such/route"),
    ]
    ids = [r.headers.get("x-request-id") for r in answers]
    assert all(i is not None and re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("my-trace-42", True), ("a" * 128, True), ("a" * 129, False), ("has space", False), ("", False)],
)
def test_a_clients_sane_request_id_is_kept(client: Client, sent: str, kept: bool) -> None:
    resp = client.get("/v1/models", headers={"x-request-id": sent})
    got = resp.headers["x-request-id"]
    assert (got == sent) is kept and (kept or got.startswith("req_"))


def test_the_request_id_is_on_the_access_log(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvproxy.access"):
        resp = client.get("/v1/models", headers={"x-request-id": "trace-7"})
    assert resp.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "kvproxy.access"]
    assert any("GET /v1/models" in line and "200" in line and "request_id=trace-7" in line for line in lines)


def test_a_shadow_job_carries_its_request_id() -> None:
    from starlette.requests import Request

    from kvproxy.api.shadow_ask import shadow_ask
    from kvproxy.http import request_id
    from kvproxy.scoring.job import ShadowJob
    from kvproxy.shadow.pool import ShadowPool
    from kvproxy.shadow.quality import QualityTracker
    from kvproxy.shadow.token_scores import TokenScoreStore

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    scope["headers"] = [(b"x-kvproxy-token-scores", b"keep"), (b"x-kvproxy-shadow", b"force")]
    scope["headers"].append((b"x-request-id", b"req_abc"))  # the client's own, kept
    asks = []

    async def route(scope: Any, receive: Any, send: Any) -> None:  # what the route reads
        asks.append(shadow_ask(Request(scope, receive), TokenScoreStore()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    asyncio.run(request_id.RequestId(route)(scope, receive, send))
    ask = asks[0]
    pool = ShadowPool(None, QualityTracker(), queue_size=1)  # type: ignore[arg-type]  # never started
    ticket = pool.ticket(ask)
    assert ticket is not None and ask.keep is not None
    ticket.submit(ShadowJob())
    assert pool._queue.get_nowait().request_id == "req_abc"
    assert ask.keep.as_dict()["request_id"] == "req_abc"  # GET /kvproxy/v1/scores/{id} names it


# ---- model and system_fingerprint in relayed bytes (issue 28, item 4) ------------------------


def test_relayed_bytes_name_the_model_as_asked() -> None:
    from kvproxy.serving.relay import Names

    names = Names("my-model", "b6100-abc-q8_0-q4_0")
    chunk = (
        b'data: {"choices":[{"delta":{"content":"\\"model\\":\\"x\\""}}],"created":1,'
        b'"model":"/models/gemma-3-270m.gguf","system_fingerprint":"b0-unknown","object":"x"}\n\n'
    )
    out = names(chunk)
    data = orjson.loads(out.removeprefix(b"data: "))
    assert data["model"] == "my-model" and data["system_fingerprint"] == "b6100-abc-q8_0-q4_0"
    assert data["choices"][0]["delta"]["content"] == '"model":"x"'  # text the model wrote: untouched
    odd = Names('a\\b"c', "f")(b'{"model":"p"}')
    assert orjson.loads(odd)["model"] == 'a\\b"c'


def test_the_fingerprint_format() -> None:
    from kvproxy.serving.base import system_fingerprint

    kv = KVConfig(KVCacheType("q8_0"), KVCacheType("q4_0"))
    assert system_fingerprint("b6100-1a2b3c4", kv) == "b6100-1a2b3c4-q8_0-q4_0"
    assert system_fingerprint(None, None) == "unknown-unknown-unknown"
