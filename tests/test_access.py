"""API keys, the admin token and the body limit, on a real proxy in front of a loopback upstream."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments
from kvproxy.deployments.spec import ProxyConfig
from kvproxy.http.access import KeySet, RouteKind, bearer_token, route_kind
from kvproxy.telemetry.server import start_metrics_server
from tests.conftest import serve_in_thread
from tests.fault_servers import fault_server
from tests.test_errors import assert_openai_error

MSG = [{"role": "user", "content": "Hi"}]
KEYS = ["sk-first-0123456789", "sk-second-abcdefghij"]
ADMIN = "admin-token-xyz"


@contextmanager
def proxy(**app_options: Any) -> Iterator[httpx.Client]:
    with fault_server("ok") as up:
        spec = {"model": "m", "primary": {"urls": [up.url]}, "health_interval": 0.2, "shadow_rate": 0}
        deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings())
        with (
            serve_in_thread(create_app(deployments, **app_options)) as url,
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            yield client


@pytest.fixture(scope="module")
def guarded() -> Iterator[httpx.Client]:
    with proxy(api_keys=KEYS, admin_token=ADMIN, max_body_bytes=4096) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def chat(client: httpx.Client, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", headers=headers, json={"model": "m", "messages": MSG, **body})


def test_route_kinds() -> None:
    assert route_kind("/v1/chat/completions") is RouteKind.SERVING
    assert route_kind("/v1/models") is RouteKind.SERVING
    assert route_kind("/kvproxy/v1/score") is RouteKind.SERVING  # carries prompt tokens
    assert route_kind("/kvproxy/v1/scores/chatcmpl-1") is RouteKind.SERVING  # a client's own response
    assert route_kind("/kvproxy/v1/status") is RouteKind.ADMIN
    assert route_kind("/metrics") is RouteKind.ADMIN
    assert route_kind("/health") is RouteKind.PUBLIC
    assert route_kind("/v1x") is RouteKind.PUBLIC


def test_bearer_parsing() -> None:
    assert bearer_token([(b"authorization", b"Bearer abc")]) == b"abc"
    assert bearer_token([(b"authorization", b"bearer   abc  ")]) == b"abc"
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([(b"x-other", b"Bearer abc")]) is None


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first key matching costs the same comparisons as no key matching."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    keys = KeySet(["k1", "k2", "k3"])
    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, expected in ((b"k1", True), (b"k3", True), (b"nope", False), (b"k" * 5000, False)):
        calls.clear()
        assert keys.matches(presented) is expected
        assert len(calls) == 3
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the input's length never shows


def test_serving_routes_need_a_key(guarded: httpx.Client) -> None:
    resp = chat(guarded)
    err = assert_openai_error(resp, 401, code="missing_api_key", contains="Authorization")
    assert resp.headers["www-authenticate"] == "Bearer"
    err = assert_openai_error(chat(guarded, bearer("sk-wrong")), 401, code="invalid_api_key")
    assert "sk-wrong" not in err["message"]
    assert_openai_error(guarded.get("/v1/models"), 401, code="missing_api_key")
    assert_openai_error(chat(guarded, {"Authorization": KEYS[0]}), 401, code="missing_api_key")  # no scheme
    for key in KEYS:  # every configured key opens them
        assert chat(guarded, bearer(key)).status_code == 200
        assert guarded.get("/v1/models", headers=bearer(key)).status_code == 200
    assert_openai_error(chat(guarded, bearer(ADMIN)), 401, code="invalid_api_key")  # admin is not a key


def test_streams_and_the_official_client(guarded: httpx.Client) -> None:
    base = str(guarded.base_url).rstrip("/") + "/v1"
    ok = openai.OpenAI(base_url=base, api_key=KEYS[1], max_retries=0)
    assert ok.chat.completions.create(model="m", messages=MSG).choices[0].message.content == "toktok"  # type: ignore[arg-type]
    bad = openai.OpenAI(base_url=base, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=MSG, stream=True)  # type: ignore[arg-type]


def test_admin_routes_need_the_admin_token(guarded: httpx.Client) -> None:
    for path in ("/kvproxy/v1/status", "/metrics"):
        assert_openai_error(guarded.get(path), 401, code="missing_admin_token")
        assert_openai_error(guarded.get(path, headers=bearer(KEYS[0])), 401, code="invalid_admin_token")
        assert guarded.get(path, headers=bearer(ADMIN)).status_code == 200
    assert guarded.get("/health").status_code == 200  # orchestrators probe without secrets
    # refusals are counted like any request
    metrics = guarded.get("/metrics", headers=bearer(ADMIN)).text
    assert 'status="401"' in metrics


def test_admin_token_alone_leaves_serving_open() -> None:
    with proxy(admin_token=ADMIN) as client:
        assert chat(client).status_code == 200
        assert client.get("/kvproxy/v1/status").status_code == 401


def test_metrics_port_checks_the_admin_token() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    Counter("kvproxy_probe", "a sample to find", registry=registry).inc()
    port = start_metrics_server("127.0.0.1", 0, registry, KeySet([ADMIN]))
    url = f"http://127.0.0.1:{port}/metrics"
    assert_openai_error(httpx.get(url), 401, code="missing_admin_token")
    assert_openai_error(httpx.get(url, headers=bearer("wrong")), 401, code="invalid_admin_token")
    resp = httpx.get(url, headers=bearer(ADMIN))
    assert resp.status_code == 200 and "kvproxy_probe_total 1.0" in resp.text
    open_port = start_metrics_server("127.0.0.1", 0, registry, KeySet([]))
    assert httpx.get(f"http://127.0.0.1:{open_port}/metrics").status_code == 200


def test_bodies_over_the_limit_are_413(guarded: httpx.Client) -> None:
    key = bearer(KEYS[0])
    big = "x" * 5000
    err = assert_openai_error(chat(guarded, key, user=big), 413, code="request_too_large", contains="4,096")
    assert big not in err["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    resp = guarded.post(
        "/v1/chat/completions", content=chunked(), headers={**key, "content-type": "application/json"}
    )
    assert_openai_error(resp, 413, code="request_too_large")
    assert chat(guarded, key, user="x" * 3000).status_code == 200  # under the limit: served


def test_auth_is_checked_before_the_body_is_read(guarded: httpx.Client) -> None:
    """An unauthenticated client learns nothing, not even the body limit."""
    assert_openai_error(chat(guarded, user="x" * 5000), 401, code="missing_api_key")


def test_settings_read_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPROXY_API_KEYS", "sekrit-a1, sekrit-b2,,sekrit-c3")
    monkeypatch.setenv("KVPROXY_ADMIN_TOKEN", "sekrit-adm")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["sekrit-a1", "sekrit-b2", "sekrit-c3"]
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "sekrit-adm"
    assert "sekrit" not in repr(s) and "sekrit" not in str(s.model_dump())  # secrets never print
    assert [k.get_secret_value() for k in Settings(api_keys=["x"]).api_keys] == ["x"]
    with pytest.raises(ValueError, match="without spaces"):
        Settings(api_keys=["has space"])


def test_kept_scores_are_the_owning_keys(gemma_path: Any) -> None:
    """Issue 20, finding 10, on a real embedded server set up as in production: another API key
    gets a 404 for a kept entry, and its own 64+ keeps do not evict it."""
    from tests.conftest import start_server, stop_server

    env = {"KVPROXY_API_KEYS": ",".join(KEYS), "KVPROXY_ADMIN_TOKEN": ADMIN}
    srv = start_server("--ctx-size", "512", env=env)
    keep = {"X-KVProxy-Token-Scores": "keep", "X-KVProxy-Shadow": "skip"}
    body = {"model": srv.model, "messages": MSG, "max_tokens": 1}
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            first = http.post("/v1/chat/completions", headers={**keep, **bearer(KEYS[0])}, json=body)
            rid = first.json()["id"]
            assert http.get(f"/kvproxy/v1/scores/{rid}", headers=bearer(KEYS[0])).status_code == 200
            other = http.get(f"/kvproxy/v1/scores/{rid}", headers=bearer(KEYS[1]))
            assert_openai_error(other, 404, code="not_found")
            assert http.get(f"/kvproxy/v1/scores/{rid}", headers=bearer(ADMIN)).status_code == 401
            for _ in range(70):
                r = http.post("/v1/chat/completions", headers={**keep, **bearer(KEYS[1])}, json=body)
                assert r.status_code == 200
            mine = http.get(f"/kvproxy/v1/scores/{rid}", headers=bearer(KEYS[0]))
            assert mine.status_code == 200 and mine.json()["status"] == "not_sampled"
    finally:
        stop_server(srv)
