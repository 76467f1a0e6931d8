"""Prompts, completions and keys are not logged, and not kept once their shadow job has ended."""

from __future__ import annotations

import gc
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments, embedded_deployment
from kvproxy.deployments.spec import ProxyConfig
from kvproxy.model.gguf_info import read_model_info
from tests.conftest import serve_in_thread, start_server, stop_server
from tests.fault_servers import fault_server


def holders_of(marker: str) -> list[str]:
    """Every live object that refers to a str or bytes holding ``marker``.

    CPython's collector does not track dicts and tuples of atomic values, so containers reachable
    from tracked objects are walked too.
    """
    gc.collect()
    needle_b = marker.encode()
    found = []
    stack: list[Any] = gc.get_objects()
    seen = {id(o) for o in stack}
    while stack:
        obj = stack.pop()
        for ref in gc.get_referents(obj):
            if isinstance(ref, str):
                if marker in ref:
                    found.append(f"{type(obj).__name__}: {str(obj)[:120]}")
            elif isinstance(ref, bytes | bytearray):
                if needle_b in ref:
                    found.append(f"{type(obj).__name__}: {str(obj)[:120]}")
            elif isinstance(ref, dict | list | tuple | set | frozenset) and id(ref) not in seen:
                seen.add(id(ref))
                stack.append(ref)
    return found


def wait_settled(client: httpx.Client, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        shadow: dict[str, Any] = client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]
        settled = shadow["sampled"] == shadow["scored"] + shadow["failed"] + shadow["dropped"]
        if shadow["sampled"] and not shadow["queued"] and not shadow["in_flight"] and settled:
            return shadow
        assert time.monotonic() < deadline, shadow
        time.sleep(0.25)  # scoring runs at SCHED_IDLE: fast polls slow it (tests/conftest.py wait_for)


def test_the_scan_finds_a_held_marker() -> None:
    marker = "zq" + uuid.uuid4().hex
    held = {"messages": [{"content": f"say {marker}"}]}
    assert holders_of(marker)
    del held
    assert holders_of(marker) == []


def _send(url: str, marker_words: list[str], model: str) -> None:
    # the marker is built inside, and nothing of the request or response outlives this function
    with httpx.Client(base_url=url, timeout=120) as client:
        content = "Repeat after me: " + "-".join(marker_words)
        resp = client.post(
            "/v1/chat/completions",
            headers={"X-KVProxy-Shadow": "force"},
            json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8},
        )
        assert resp.status_code == 200, resp.text
        del content, resp


def test_an_embedded_job_keeps_nothing_once_scored(gemma_path: Path) -> None:
    settings = Settings(model=gemma_path, ctx_size=512, shadow_rate=0)
    deployment = embedded_deployment(settings, read_model_info(gemma_path))
    words = ["zq", uuid.uuid4().hex[:12], "xv"]
    marker = "-".join(words)
    with serve_in_thread(create_app(deployment)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        _send(url, words, deployment.name)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert wait_settled(client)["scored"] == 1
        assert holders_of(marker) == []


def test_an_http_job_keeps_nothing_once_it_failed() -> None:
    """The HTTP path holds the messages until the reference tokenizes them; a failing reference must
    not leave them behind either."""
    words = ["zq", uuid.uuid4().hex[:12], "xv"]
    marker = "-".join(words)
    with fault_server("ok") as up, fault_server("error500") as ref:
        spec = {
            "model": "m",
            "primary": {"urls": [up.url]},
            "reference": {"urls": [ref.url]},
            "shadow_rate": 0,
        }
        deployments = build_deployments(ProxyConfig(deployments=[spec]), Settings())
        with serve_in_thread(create_app(deployments)) as url:
            _send(url, words, "m")
            with httpx.Client(base_url=url, timeout=60) as client:
                shadow = wait_settled(client)
            assert shadow["failed"] + shadow["dropped"] == 1
            assert holders_of(marker) == []


def test_prompts_completions_and_keys_are_not_logged() -> None:
    """At the default log level, with a request refused, one served and one shadow-scored."""
    key = "sk-" + uuid.uuid4().hex
    marker = "zq" + uuid.uuid4().hex[:10]
    srv = start_server("--ctx-size", "512", "--api-key", key, "--shadow-rate", "1")
    try:
        with httpx.Client(base_url=srv.base_url, timeout=120) as client:
            body = {
                "model": srv.model,
                "messages": [{"role": "user", "content": f"Say {marker}"}],
                "max_tokens": 8,
            }
            assert client.post("/v1/chat/completions", json=body).status_code == 401
            wrong = {"Authorization": f"Bearer {key}x"}
            assert client.post("/v1/chat/completions", json=body, headers=wrong).status_code == 401
            ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
            answer = ok.json()["choices"][0]["message"]["content"]
            bad = client.post(
                "/v1/chat/completions",
                content=b'{"messages": "' + marker.encode() + b"\xff",
                headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            assert bad.status_code == 400 and marker not in bad.text
            deadline = time.monotonic() + 60
            while "scored" not in "".join(srv.output) and time.monotonic() < deadline:
                if client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]["scored"]:
                    break
                time.sleep(0.1)
    finally:
        stop_server(srv)
    log = "".join(srv.output)
    assert "1 API key(s)" in log  # the start-up line says keys are on, not what they are
    assert key not in log and key[3:] not in log
    assert marker not in log
    assert answer.strip() and answer.strip() not in log
