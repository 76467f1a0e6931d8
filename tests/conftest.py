"""Shared fixtures: the real bundled Gemma 3 270M and a real ``kvproxy serve`` process."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.workers import isolate_worker, worker_index

isolate_worker()  # before llama.cpp (and its OpenMP runtime) is loaded in this process

import httpx  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402

from kvproxy.backends.embedded import bundled_model_path  # noqa: E402

# `make test-fast` (the edit loop's tier, `pytest -m fast`): the modules that start no llama-server
# and load the model at most once (test_kld's real logits), or only through the one shared `server`
# (test_errors, test_compat_model); besides these, single tests marked `@pytest.mark.fast` (refusals
# run in process: tests/cli_runner.py). Everything else, and these, runs under `make test`.
FAST_MODULES = frozenset(
    {
        "test_api_fast", "test_compat_fast", "test_sse", "test_textstream", "test_kld",
        "test_kld_threads", "test_prompt_fill", "test_schema_limits", "test_build_cache",
        "test_deploy", "test_drift", "test_guard", "test_quality", "test_loadwatch", "test_gpu",
        "test_chat_template", "test_cli_options", "test_shadow", "test_relay_line_endings",
        "test_errors", "test_compat_model", "test_responses_render", "test_llama_args",
        "test_score_contract", "test_layering", "test_telemetry_collector",
    }
)  # fmt: skip


# Every module of 8 s or more, longest first (test-seconds of a `make test` run, 2026-12-07): under
# pytest-xdist they are handed out in this order, so the last modules a worker takes are short ones
# and neither worker is left running a long module while the other has finished. The Makefile passes
# --no-loadscope-reorder: xdist's default hands out modules by their number of tests, most first,
# which sent one-test modules such as the 45 s drift scenario and the 40 s schema fuzz out last.
LONG_MODULES = (
    "test_score_paths_agreement", "test_client_matrix", "test_served_replay_jinja", "test_whatif",
    "test_decode_path", "test_tools_side_by_side_native", "test_embedded_load",
    "test_drift_scenario", "test_shadow_e2e", "test_tools_embedded", "test_llama_server",
    "test_prometheus", "test_architectures", "test_faults_matrix", "test_schema_fuzz",
    "test_served_replay_cached", "test_shadow_unchanged", "test_connections", "test_calibrate",
    "test_row_capture",
    "test_shutdown", "test_message_spans", "test_clients", "test_untrusted_schemas",
    "test_whatif_proxy", "test_tools_side_by_side", "test_privacy", "test_ui", "test_gguf_info",
    "test_openai_client", "test_startup", "test_forced_tools_replay", "test_arch_memory",
    "test_slots", "test_compat_proxy", "test_access", "test_metrics", "test_errors",
)  # fmt: skip


def _module(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _module(item) in FAST_MODULES:
            item.add_marker(pytest.mark.fast)
    if worker_index() is not None:  # a stable sort: each module's own order is kept
        rank = {name: i for i, name in enumerate(LONG_MODULES)}
        items.sort(key=lambda item: rank.get(_module(item), len(rank)))


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return bundled_model_path()


def kvproxy_cache() -> Path:
    """Where `make` keeps what it builds once (wheels, llama.cpp tools): ``$KVPROXY_CACHE``."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvproxy"
    return Path(os.environ.get("KVPROXY_CACHE") or default)


@pytest.fixture(scope="session")
def tiny_gemma_path(gemma_path: Path) -> Path:
    """tests/tiny_gemma3.py: the bundled tokenizer with small random weights, for tests whose
    model's weights do not matter. Written once (about 18 s) into the cache and reused."""
    from tests.tiny_gemma3 import write_tiny_gemma3

    out = kvproxy_cache() / "tiny-models" / f"tiny-gemma3-v2-{gemma_path.stem}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_tiny_gemma3(gemma_path, out)


@dataclass
class RunningServer:
    base_url: str
    model: str
    process: subprocess.Popen[str]
    output: list[str]
    models: list[str]

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"


READY = re.compile(r"ready: (http://\S+)/v1 serving models? (.+)$")


def start_server(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    command: str = "serve",
    file_limit: int | None = None,
) -> RunningServer:
    """Run ``python -m kvproxy serve --port 0 ARGS`` and wait for its ready line. ``file_limit``:
    the process's RLIMIT_NOFILE, soft and hard."""

    def limit_files() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    proc = subprocess.Popen(
        [sys.executable, "-m", "kvproxy", command, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # the start-up probe (a child that loads the model once more, ~7 s) is off unless a test asks
        # for it with --probe: tests/test_model_faults.py and tests/test_architectures.py do
        env={**os.environ, "PYTHONUNBUFFERED": "1", "KVPROXY_PROBE": "0", **(env or {})},
        preexec_fn=limit_files if file_limit is not None else None,
    )
    output: list[str] = []
    found: list[tuple[str, str]] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            m = READY.search(line.rstrip("\n"))
            if m:
                found.append((m.group(1), m.group(2)))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("kvproxy serve did not become ready:\n" + "".join(output))
        time.sleep(0.05)
    names = re.findall(r"'([^']+)'", found[0][1])
    return RunningServer(found[0][0], names[0], proc, output, names)


def stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The embedded default (Gemma 3 270M, q4_0 K and V) with a 2048-token context."""
    srv = start_server("--ctx-size", "2048")
    yield srv
    stop_server(srv)


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@contextlib.contextmanager
def serve_in_thread(asgi: Any) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on a free loopback port; yields its base URL."""
    config = uvicorn.Config(asgi, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the deadline passes.

    The pause between polls grows from 20 ms to a quarter of a second: a short wait stays short, and a long
    one does not keep the core busy. That matters because shadow scoring runs at SCHED_IDLE (it gets
    a core only when nothing else wants it): polling a status route every 20 ms while a job is scored
    on the same pinned core doubled the what-if seed's set-up (104.6 s, 47.9 s polling every 0.5 s)."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause)
        pause = min(0.25, pause * 1.5)
    return predicate()
