"""Failure behaviour in front of misbehaving upstreams (real loopback servers, real kvproxy)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments
from kvproxy.deployments.spec import ProxyConfig
from tests.conftest import serve_in_thread, wait_for
from tests.fault_servers import fault_server
from tests.llama_servers import free_port

MSG = [{"role": "user", "content": "Hi"}]


@contextmanager
def proxy(primary: str, reference: str | None = None, **extra: Any) -> Iterator[httpx.Client]:
    spec: dict[str, Any] = {
        "model": "m",
        "primary": {"urls": [primary]},
        "timeouts": {"connect": 1, "read": 1, "total": 2},
        "health_interval": 0.2,
        "shadow_rate": 0,  # only the X-KVProxy-Shadow header shadows
        **extra,
    }
    if reference:
        spec["reference"] = {"urls": [reference]}
    deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings())
    with serve_in_thread(create_app(deployments)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def chat(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, **body})


def error_of(resp: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def sse_payloads(resp: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


def test_refused_upstream_is_502_and_the_proxy_keeps_serving() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with proxy(dead) as client:
        for _ in range(2):
            resp = chat(client)
            assert resp.status_code == 502
            assert error_of(resp)["code"] == "upstream_unavailable"
        assert client.get("/health").status_code == 200
        status = client.get("/kvproxy/v1/status").json()["deployments"][0]
        assert status["primary_replicas"][0]["healthy"] is False


def test_hanging_upstream_is_504_at_the_deadline() -> None:
    with fault_server("hang") as up, proxy(up.url) as client:
        start = time.monotonic()
        resp = chat(client)
        assert resp.status_code == 504
        assert error_of(resp)["code"] == "upstream_timeout"
        assert time.monotonic() - start < 5


def test_upstream_error_status_is_mapped() -> None:
    with fault_server("error500") as up, proxy(up.url) as client:
        resp = chat(client)
        assert resp.status_code == 502
        err = error_of(resp)
        assert err["code"] == "upstream_error" and "boom" in err["message"]


def test_upstream_dying_mid_stream_ends_with_an_error_event() -> None:
    with (
        fault_server("midstream") as up,
        proxy(up.url) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True}
        ) as resp,
    ):
        assert resp.status_code == 200
        events = sse_payloads(resp)
    assert events[0]["choices"][0]["delta"]["content"] == "tok"
    assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"


def test_reference_failures_never_touch_the_client_response() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with fault_server("ok") as up, proxy(up.url, reference=dead) as client:
        plain = chat(client)
        forced = client.post(
            "/v1/chat/completions",
            headers={"X-KVProxy-Shadow": "force"},
            json={"model": "m", "messages": MSG},
        )
        assert plain.status_code == forced.status_code == 200
        assert forced.content == plain.content  # the shadowed answer is the unshadowed one
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            shadow = client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]
            if shadow["failed"] + shadow["scored"] >= 1:
                break
            time.sleep(0.05)
        assert shadow["sampled"] == 1 and shadow["failed"] == 1 and shadow["scored"] == 0


def test_logprobs_the_client_asked_for_are_kept_and_trimmed() -> None:
    """With ``primary_logprobs`` the shadow asks for a top 20: the client gets the top it asked for."""
    with fault_server("ok") as up, proxy(up.url, reference=up.url, primary_logprobs=True) as client:
        resp = client.post(
            "/v1/chat/completions",
            headers={"X-KVProxy-Shadow": "force"},
            json={"model": "m", "messages": MSG, "logprobs": True, "top_logprobs": 1},
        )
        content = resp.json()["choices"][0]["logprobs"]["content"]
        assert [len(e["top_logprobs"]) for e in content] == [1, 1]


def proxy_replicas(urls: list[str]) -> Any:
    spec = {
        "model": "m",
        "primary": {"urls": urls},
        "health_interval": 0.1,
        "timeouts": {"connect": 1, "read": 2, "total": 5},
    }
    return proxy_spec(spec)


@contextmanager
def proxy_spec(spec: dict[str, Any]) -> Iterator[httpx.Client]:
    deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings())
    with serve_in_thread(create_app(deployments)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def replica_health(client: httpx.Client) -> list[bool]:
    return [
        r["healthy"] for r in client.get("/kvproxy/v1/status").json()["deployments"][0]["primary_replicas"]
    ]


def test_a_dead_replica_is_ejected_and_traffic_fails_over() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with fault_server("ok") as live, proxy_replicas([dead, live.url]) as client:
        assert all(chat(client).status_code == 200 for _ in range(10))
        assert live.posts == 10
        assert replica_health(client) == [False, True]


def test_balancing_and_the_return_of_a_recovered_replica() -> None:
    import concurrent.futures

    port = free_port()

    def burst(client: httpx.Client, n: int = 32) -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: chat(client).status_code, range(n)))

    with fault_server("ok") as a, proxy_replicas([a.url, f"http://127.0.0.1:{port}"]) as client:
        with fault_server("ok", port=port) as b:
            assert wait_for(lambda: replica_health(client) == [True, True])
            assert burst(client) == [200] * 32
            assert a.posts > 0 and b.posts > 0  # least outstanding spreads concurrent requests
        assert wait_for(lambda: replica_health(client) == [True, False])  # b went away: ejected
        assert burst(client, 8) == [200] * 8
        with fault_server("ok", port=port) as b_again:
            assert wait_for(lambda: replica_health(client) == [True, True])  # and back after recovery
            assert burst(client) == [200] * 32
            assert b_again.posts > 0


def test_malformed_upstream_json_on_a_shadowed_request_is_502() -> None:
    with fault_server("garbage") as up, proxy(up.url, reference=up.url) as client:
        resp = client.post(
            "/v1/chat/completions",
            headers={"X-KVProxy-Shadow": "force"},
            json={"model": "m", "messages": MSG},
        )
        assert resp.status_code == 502
        assert error_of(resp)["code"] == "upstream_invalid_response"
        shadow = client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]
        assert shadow["sampled"] == 1 and shadow["dropped"] == 1


def test_a_reference_down_at_start_is_identified_when_it_comes_up() -> None:
    port = free_port()
    with fault_server("ok") as up, proxy(up.url, reference=f"http://127.0.0.1:{port}") as client:
        assert client.get("/kvproxy/v1/status").json()["deployments"][0]["estimator"] == "undetermined"
        with fault_server("ok", port=port):  # a plain upstream: /kvproxy/v1/info is a 404
            client.post(
                "/v1/chat/completions",
                headers={"X-KVProxy-Shadow": "force"},
                json={"model": "m", "messages": MSG},
            )
            assert wait_for(
                lambda: client.get("/kvproxy/v1/status").json()["deployments"][0]["estimator"] == "top-20"
            )
