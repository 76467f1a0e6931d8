"""Start-up: settings from flags and environment, clear refusals, and readiness while loading."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvproxy.app import create_app
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import KVCacheType, Settings
from kvproxy.deployments.build import embedded_deployment
from kvproxy.model.gguf_info import read_model_info
from tests.cli_runner import run_cli_in_process
from tests.conftest import serve_in_thread, start_server, stop_server

MSG = [{"role": "user", "content": "Hi"}]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m kvproxy ARGS`` in a process of its own; ``timeout`` only guards against a hang (a
    sweep takes longer)."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "kvproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        # port 0 unless ARGS or ``env`` say otherwise: a refusal never needs the default 8000,
        # which another run (or another xdist worker) may hold
        env={**os.environ, "KVPROXY_PORT": "0", **(env or {})},
    )


def test_defaults_are_the_embedded_q4_0_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL", "CACHE_TYPE_K", "CACHE_TYPE_V", "HOST", "PORT", "CTX_SIZE"):
        monkeypatch.delenv(f"KVPROXY_{name}", raising=False)
    s = Settings()
    assert s.model is None
    assert (s.cache_type_k, s.cache_type_v) == (KVCacheType.Q4_0, KVCacheType.Q4_0)
    assert s.flash_attn is True
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_environment_then_explicit_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPROXY_CACHE_TYPE_K", "q8_0")
    monkeypatch.setenv("KVPROXY_CTX_SIZE", "1024")
    s = Settings()
    assert s.cache_type_k is KVCacheType.Q8_0 and s.ctx_size == 1024
    assert Settings(ctx_size=512).ctx_size == 512  # what the CLI passes wins over the environment


def test_quantized_v_without_flash_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="flash attention"):
        Settings(cache_type_v=KVCacheType.Q4_0, flash_attn=False)
    assert Settings(cache_type_v=KVCacheType.F16, flash_attn=False).flash_attn is False


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--model", "/nonexistent/model.gguf"], {}, "does not exist"),
        (["--cache-type-k", "q3_k"], {}, "q3_k"),
        ([], {"KVPROXY_CACHE_TYPE_K": "q3_k"}, "cache_type_k"),
        ([], {"KVPROXY_PORT": "http"}, "port"),
        (["--no-flash-attn"], {}, "flash attention"),
        (["--ctx-size", "4"], {}, "ctx_size"),
    ],
)
@pytest.mark.fast  # in process, no model
def test_bad_settings_exit_2_with_a_clear_message(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_cli_in_process("serve", *args, env=env)
    assert_startup_failure(result, message)


def assert_startup_failure(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, and one line on stderr that names the cause: no traceback (issue 20)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvproxy: error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-level", "bogus"], {}, "unknown log level 'bogus'"),
        ([], {"KVPROXY_LOG_LEVEL": "verbose"}, "unknown log level 'verbose'"),
        (["--admin-token", ""], {}, "admin_token"),
        ([], {"KVPROXY_ADMIN_TOKEN": ""}, "admin_token"),
        (["--api-key", ""], {}, "api_keys"),
        ([], {"KVPROXY_API_KEYS": " , "}, "KVPROXY_API_KEYS is set but holds no key"),
        (["--host", "no-such-host.invalid", "--port", "0"], {}, "cannot resolve 'no-such-host.invalid'"),
        (["--port", "8123", "--metrics-port", "8123"], {}, "--metrics-port 8123 is --port too"),
    ],
)
@pytest.mark.fast  # in process, no model
def test_startup_failures_exit_2_with_one_line(args: list[str], env: dict[str, str], message: str) -> None:
    """Issue 20, findings 6, 7 and 9."""
    result = run_cli_in_process("serve", *args, env=env)
    assert_startup_failure(result, message)


def test_a_connection_cap_past_the_open_file_limit_exits_2_with_one_line() -> None:
    """Issue 20, finding 9: checked where the server starts, after the model has loaded, so in a
    process of its own."""
    result = run_cli("serve", "--port", "0", "--max-connections", "999999999")
    assert_startup_failure(result, "open-file limit")


@pytest.mark.fast  # in process, no model
def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    """Issue 20, finding 6: a second instance on a port exited 3 with an AttributeError; a taken
    --metrics-port exited 1 with an OSError traceback. Both are refused before the model loads."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        start = time.monotonic()
        result = run_cli_in_process("serve", "--port", port)
        assert_startup_failure(
            result, f"cannot listen on 127.0.0.1:{port} (--host/--port): the address is already in use"
        )
        result = run_cli_in_process("serve", "--port", "0", "--metrics-port", port)
        assert_startup_failure(result, f"127.0.0.1:{port} (--metrics-port): the address is already in use")
        assert time.monotonic() - start < 30  # before any model is loaded
        assert "model " not in result.stdout  # nor its banner printed


@pytest.mark.fast  # in process, no model
def test_gguf_files_that_are_not_models_exit_2_with_the_reason(tmp_path: Path) -> None:
    """Issue 20, finding 8."""
    from tests.test_gguf_info import bad_ggufs

    for path, reason in bad_ggufs(tmp_path).values():
        assert_startup_failure(run_cli_in_process("serve", "--port", "0", "--model", str(path)), reason)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    # a subprocess: in process, this refusal left the test process's next in-process generation
    # (test_503_while_loading_then_200) too slow for its client's 5 s timeout
    result = run_cli("serve", "--model", str(bogus))
    assert result.returncode == 2
    assert "not a readable GGUF" in result.stderr


def test_environment_and_flags_configure_a_real_server() -> None:
    srv = start_server(
        "--cache-type-v",
        "q8_0",
        "--ctx-size",
        "1024",
        env={"KVPROXY_CACHE_TYPE_K": "q8_0", "KVPROXY_CACHE_TYPE_V": "f16", "KVPROXY_ALIAS": "gemma-test"},
    )
    try:
        out = "".join(srv.output)
        assert "K=q8_0 V=q8_0" in out  # the flag beat KVPROXY_CACHE_TYPE_V
        assert "9,792 per token (f16 would be 18,432" in out
        assert "template: gemma3 family" in out
        assert srv.model == "gemma-test"
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["gemma-test"]
            resp = http.post(
                "/v1/chat/completions", json={"model": "gemma-test", "messages": MSG, "max_tokens": 3}
            )
            assert resp.status_code == 200
            assert re.fullmatch(r"llama-cpp-python-[0-9.]+-q8_0-q8_0", resp.json()["system_fingerprint"])
    finally:
        stop_server(srv)


class GatedBackend(EmbeddedBackend):
    """Fault injection: the real backend, but loading waits for a gate (or fails on purpose)."""

    def __init__(self, *args: object, fail: bool = False) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.fail = fail

    def _load_blocking(self) -> None:
        self.gate.wait(timeout=60)
        if self.fail:
            raise RuntimeError("injected load failure")
        super()._load_blocking()


def test_503_while_loading_then_200(gemma_path: Path) -> None:
    settings = Settings(ctx_size=512)
    info = read_model_info(gemma_path)
    backend = GatedBackend(settings, info)
    ready = threading.Event()
    app = create_app(embedded_deployment(settings, info, backend), on_ready=ready.set)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "model_loading"
        chat = http.post("/v1/chat/completions", json={"model": "Gemma 3 270m", "messages": MSG})
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "unavailable_error"
        backend.gate.set()
        assert ready.wait(timeout=60)
        assert http.get("/health").status_code == 200
        chat = http.post(
            "/v1/chat/completions", json={"model": "Gemma 3 270m", "messages": MSG, "max_tokens": 2}
        )
        assert chat.status_code == 200


def test_a_failed_load_is_reported_not_hidden(gemma_path: Path) -> None:
    settings = Settings(ctx_size=512)
    info = read_model_info(gemma_path)
    backend = GatedBackend(settings, info, fail=True)
    failures: list[BaseException] = []
    backend.gate.set()
    app = create_app(embedded_deployment(settings, info, backend), on_load_failed=failures.append)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert failures and "injected load failure" in str(failures[0])
        health = http.get("/health")
        assert health.status_code == 500
        assert health.json()["error"]["code"] == "model_load_failed"
        chat = http.post("/v1/chat/completions", json={"model": "Gemma 3 270m", "messages": MSG})
        assert chat.status_code == 500 and "injected load failure" in chat.json()["error"]["message"]


def test_a_model_llama_cpp_cannot_load_exits_2_with_one_error_line(tmp_path: Path) -> None:
    """A GGUF whose header is a model's but that has no weights: llama.cpp fails to load it after the
    server started (it exited 1, and the cause was logged twice). And one whose head size does not
    fill the KV type's blocks, refused before loading (it was a ValueError traceback)."""
    from tests.test_gguf_info import write_bad_gguf

    hollow = write_bad_gguf(
        tmp_path / "hollow.gguf", "llama", block_count=2, embedding_length=256, attention__head_count=4
    )
    # the start-up probe (on by default) meets it first, in its child, and names llama.cpp's reason
    result = run_cli("serve", "--port", "0", "--model", str(hollow))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert errors == [
        f"kvproxy: error: llama.cpp cannot serve {hollow}: error loading model hyperparameters: "
        "key not found in model: llama.context_length"
    ]
    # without the probe the server's own load fails, and that is one line and exit 2 too
    result = run_cli("serve", "--port", "0", "--no-probe", "--model", str(hollow))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert errors == [f"kvproxy: error: the model failed to load: Failed to load model from file: {hollow}"]
    narrow = write_bad_gguf(
        tmp_path / "narrow.gguf", "llama", block_count=2, embedding_length=64, attention__head_count=4
    )
    result = run_cli("serve", "--port", "0", "--model", str(narrow))
    assert_startup_failure(
        result, "its KV cache cannot be q4_0/q4_0: 16 values do not fill whole q4_0 blocks"
    )
