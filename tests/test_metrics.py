"""Prometheus metrics: a fresh registry per test, sample values asserted after real scored jobs."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments, embedded_deployment
from kvproxy.deployments.spec import ProxyConfig
from kvproxy.model.gguf_info import read_model_info
from kvproxy.telemetry.gpu import GpuMonitor
from kvproxy.telemetry.metrics import Metrics, position_bucket
from tests.conftest import serve_in_thread
from tests.fault_servers import fault_server
from tests.gpu_fakes import NoGpu
from tests.llama_servers import free_port

FORCE = {"X-KVProxy-Shadow": "force"}


def wait_scored(http: httpx.Client, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        d: dict[str, Any] = http.get("/kvproxy/v1/status").json()["deployments"][0]
        s = d["shadow"]
        if s["scored"] + s["failed"] + s["dropped"] >= n and s["in_flight"] == 0:
            return d
        assert time.monotonic() < deadline
        time.sleep(0.25)  # scoring runs at SCHED_IDLE: fast polls slow it (tests/conftest.py wait_for)


def test_position_buckets() -> None:
    assert [position_bucket(p) for p in (0, 511, 512, 2047, 2048, 8191, 8192, 32767, 32768, 10**6)] == [
        "<512",
        "<512",
        "512-2k",
        "512-2k",
        "2k-8k",
        "2k-8k",
        "8k-32k",
        "8k-32k",
        ">32k",
        ">32k",
    ]


def test_embedded_metrics_after_real_scored_jobs(gemma_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    settings = Settings(ctx_size=1024, shadow_rate=0.0)
    deployment = embedded_deployment(settings, read_model_info(gemma_path), metrics=metrics)
    app = create_app(deployment, metrics=metrics, gpu=GpuMonitor(NoGpu()))
    ready_deadline = time.monotonic() + 60
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        while http.get("/health").status_code != 200:
            assert time.monotonic() < ready_deadline
            time.sleep(0.05)
        prompt_tokens = 0
        for prompt in ("The history of the Roman Empire", "In the beginning of the year"):
            r = http.post(
                "/v1/completions",
                headers=FORCE,
                json={"model": "Gemma 3 270m", "prompt": prompt, "max_tokens": 20, "temperature": 0},
            )
            assert r.status_code == 200
            prompt_tokens += r.json()["usage"]["prompt_tokens"]
        assert http.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"}).status_code == 404
        status = wait_scored(http, 2)
        exposition = http.get("/metrics").text
    value = registry.get_sample_value
    q = {
        "deployment": "Gemma 3 270m",
        "model": "Gemma 3 270m",
        "cache_type_k": "q4_0",
        "cache_type_v": "q4_0",
        "reference_type": "f16",
        "estimator": "exact",
        "score_path": "decode",
    }
    tokens = status["shadow"]["scored_tokens"]
    assert tokens >= 40
    assert value("kvproxy_scored_tokens_total", q) == tokens
    assert value("kvproxy_token_kld_count", {**q, "context": "<512"}) == tokens  # short prompts
    assert value("kvproxy_token_kld_sum", {**q, "context": "<512"}) == pytest.approx(
        status["kld"]["since_start"]["mean"] * tokens, rel=1e-9
    )
    assert value("kvproxy_request_mean_kld_count", q) == 2
    assert value("kvproxy_same_top_tokens_total", q) == round(
        status["kld"]["since_start"]["same_top"] * tokens
    )
    assert value("kvproxy_token_delta_p_count", q) == tokens
    # the same tokens by turn: text answers here (tool turns: tests/test_tools_embedded.py)
    turn = {"deployment": "Gemma 3 270m", "model": "Gemma 3 270m"}
    assert value("kvproxy_turn_token_kld_count", {**turn, "turn": "text"}) == tokens
    assert value("kvproxy_turn_token_kld_sum", {**turn, "turn": "text"}) == pytest.approx(
        value("kvproxy_token_kld_sum", {**q, "context": "<512"}), rel=1e-12
    )
    assert value("kvproxy_turn_token_kld_count", {**turn, "turn": "tool_call"}) == 0
    for outcome, expected in (("sampled", 2), ("scored", 2), ("dropped", 0), ("failed", 0)):
        assert (
            value("kvproxy_shadow_requests_total", {"deployment": "Gemma 3 270m", "outcome": outcome})
            == expected
        )
    assert value("kvproxy_shadow_queue_depth", {"deployment": "Gemma 3 270m"}) == 0
    assert value("kvproxy_drift_state", {"deployment": "Gemma 3 270m"}) == -1  # warming up: 2 of 50 requests
    assert status["drift"]["state"] == "warmup" and status["drift"]["requests"] == 2
    assert value("kvproxy_shadow_lag_seconds_count", {"deployment": "Gemma 3 270m"}) == 2
    kv = {"deployment": "Gemma 3 270m", "role": "primary", "cache_type_k": "q4_0", "cache_type_v": "q4_0"}
    assert value("kvproxy_kv_cache_bytes_per_token", kv) == 5184
    # as llama.cpp allocates it: sliding-window layers keep the window plus one micro-batch (512 + 512)
    assert value("kvproxy_kv_cache_bytes", kv) == 288 * 18 * 1024
    assert value("kvproxy_kv_cache_saving_ratio", kv) == pytest.approx(18432 / 5184)  # 3.56x
    ref = {**kv, "role": "reference", "cache_type_k": "f16", "cache_type_v": "f16"}
    assert value("kvproxy_kv_cache_saving_ratio", ref) == 1.0
    assert (
        value("kvproxy_requests_total", {"route": "/v1/completions", "method": "POST", "status": "200"}) == 2
    )
    assert (
        value("kvproxy_requests_total", {"route": "/v1/completions", "method": "POST", "status": "404"}) == 1
    )
    d = {"deployment": "Gemma 3 270m"}
    assert value("kvproxy_time_to_first_token_seconds_count", d) == 2
    assert value("kvproxy_inter_token_latency_seconds_count", d) >= 30  # about one per token after the first
    assert value("kvproxy_completion_tokens_total", d) == 40
    assert value("kvproxy_prompt_tokens_total", d) == prompt_tokens
    # read while serving (the gauge follows the live backend: the model is closed by now)
    assert 'kvproxy_backend_up{deployment="Gemma 3 270m",replica="embedded",role="primary"} 1.0' in exposition
    assert "gpt-5" not in exposition  # an unknown model never becomes a label value
    assert "kvproxy_token_kld_bucket{" in exposition and 'le="1e-05"' in exposition
    assert "process_resident_memory_bytes" not in exposition  # the fresh registry has only ours


def test_http_shadow_outcomes_are_counted() -> None:
    registry = CollectorRegistry()
    dead = f"http://127.0.0.1:{free_port()}"
    with fault_server("ok") as up:
        spec = {"model": "m", "primary": {"urls": [up.url]}, "reference": {"urls": [dead]}, "shadow_rate": 0}
        metrics = Metrics(registry)
        deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings(), metrics=metrics)
        app = create_app(deployments, metrics=metrics)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            for headers in (FORCE, {}):
                r = http.post(
                    "/v1/chat/completions",
                    headers=headers,
                    json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
                )
                assert r.status_code == 200
            wait_scored(http, 1)
    value = registry.get_sample_value
    assert value("kvproxy_shadow_requests_total", {"deployment": "m", "outcome": "sampled"}) == 1
    assert value("kvproxy_shadow_requests_total", {"deployment": "m", "outcome": "failed"}) == 1
    assert (
        value("kvproxy_requests_total", {"route": "/v1/chat/completions", "method": "POST", "status": "200"})
        == 2
    )
    assert value("kvproxy_completion_tokens_total", {"deployment": "m"}) == 2 * 2  # from the upstream's usage
    assert value("kvproxy_backend_up", {"deployment": "m", "role": "primary", "replica": up.url}) == 1
    assert value("kvproxy_backend_up", {"deployment": "m", "role": "reference", "replica": dead}) == 0


def test_upstream_errors_by_kind() -> None:
    registry = CollectorRegistry()
    dead = f"http://127.0.0.1:{free_port()}"
    with fault_server("hang") as hang:
        specs: list[dict[str, Any]] = [
            {"model": "dead", "primary": {"urls": [dead]}},
            {
                "model": "hang",
                "primary": {"urls": [hang.url]},
                "timeouts": {"connect": 1, "read": 1, "total": 1},
            },
        ]
        metrics = Metrics(registry)
        deployments = build_deployments(ProxyConfig(deployments=specs), Settings(), metrics=metrics)
        app = create_app(deployments, metrics=metrics)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            for model, status in (("dead", 502), ("hang", 504)):
                body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
                assert http.post("/v1/chat/completions", json=body).status_code == status
    value = registry.get_sample_value
    assert value("kvproxy_upstream_errors_total", {"deployment": "dead", "kind": "unavailable"}) == 1
    assert value("kvproxy_upstream_errors_total", {"deployment": "hang", "kind": "timeout"}) == 1
    assert value("kvproxy_upstream_errors_total", {"deployment": "hang", "kind": "unavailable"}) == 0


def test_metrics_on_a_separate_port() -> None:
    from tests.conftest import start_server, stop_server

    port = free_port()
    srv = start_server("--ctx-size", "512", "--metrics-port", str(port))
    try:
        main = httpx.get(f"{srv.base_url}/metrics", timeout=10)
        separate = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert main.status_code == separate.status_code == 200
        for text in (main.text, separate.text):
            assert 'kvproxy_kv_cache_bytes_per_token{cache_type_k="q4_0"' in text
            assert "process_resident_memory_bytes" in text
            assert re.search(r"^kvproxy_gpu_present [01]\.0$", text, re.M)  # whatever this host has
    finally:
        stop_server(srv)


# every method llhttp (uvicorn's httptools) parses
PARSED_METHODS = {
    "DELETE", "GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "TRACE", "COPY", "LOCK", "MKCOL", "MOVE",
    "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND", "UNBIND", "ACL", "REPORT", "MKACTIVITY",
    "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PATCH", "PURGE", "MKCALENDAR",
    "LINK", "UNLINK", "SOURCE", "QUERY",
}  # fmt: skip


def test_http_methods_are_labels_only_from_a_fixed_set() -> None:
    """Issue 20, finding 11: 35 methods the parser accepts made 424 new kvproxy_requests_total series."""
    import socket

    from kvproxy.telemetry.metrics import HTTP_METHODS

    registry = CollectorRegistry()
    with fault_server("ok") as up:
        metrics = Metrics(registry)
        spec = {"model": "m", "primary": {"urls": [up.url]}}
        deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings(), metrics=metrics)
        app = create_app(deployments, metrics=metrics)
        with serve_in_thread(app) as url:
            host, port = url.removeprefix("http://").split(":")
            for method in PARSED_METHODS:
                for path in ("/v1/models", "/health", "/nowhere"):
                    with socket.create_connection((host, int(port)), timeout=10) as sock:
                        sock.sendall(
                            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                        )
                        while sock.recv(65536):
                            pass
    methods = {
        s.labels["method"]
        for family in registry.collect()
        if family.name == "kvproxy_requests"
        for s in family.samples
    }
    assert methods <= HTTP_METHODS | {"other"}, methods
    assert "other" in methods and "GET" in methods
    assert registry.get_sample_value(
        "kvproxy_requests_total", {"route": "/health", "method": "other", "status": "405"}
    )
