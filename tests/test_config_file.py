"""The deployments file and the proxy-mode flags: validation, environment overrides, mixed kinds."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from kvproxy.deployments.spec import ProxyConfig
from tests.cli_runner import run_cli_in_process
from tests.conftest import start_server, stop_server
from tests.fault_servers import fault_server

GOOD = """
[[deployments]]
model = "a"
primary = { urls = ["http://127.0.0.1:9/"], cache_type_k = "q4_0" }
reference = { urls = ["http://127.0.0.1:10"] }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployments.toml"
    path.write_text(text)
    return path


def test_a_good_file(tmp_path: Path) -> None:
    cfg = ProxyConfig.from_file(write(tmp_path, GOOD))
    d = cfg.deployments[0]
    assert d.primary.urls == ["http://127.0.0.1:9"]
    assert str(d.primary.kv()) == "q4_0"  # V defaults to K's type when only K is declared
    assert d.reference is not None and str(d.reference.kv(default=None)) == "None"
    assert d.shadow_rate == 0.1 and d.top_k == 20


def test_the_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    override = [{"model": "from-env", "primary": {"urls": ["http://127.0.0.1:11"]}}]
    monkeypatch.setenv("KVPROXY_CONFIG_DEPLOYMENTS", json.dumps(override))
    cfg = ProxyConfig.from_file(write(tmp_path, GOOD))
    assert [d.model for d in cfg.deployments] == ["from-env"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[deployments]\nmodel=", "not valid TOML"),
        (GOOD + GOOD, "unique"),
        (GOOD.replace('model = "a"', 'model = "a"\nfrobnicate = 1'), "frobnicate"),
        (GOOD.replace("http://127.0.0.1:9/", "ftp://x"), "not an http(s) URL"),
        (
            GOOD.replace('reference = { urls = ["http://127.0.0.1:10"] }', "reference = { embedded = true }"),
            "kvproxy backend",
        ),
        (
            '[[deployments]]\nmodel = "a"\nprimary = { embedded = true }\n'
            '[[deployments]]\nmodel = "b"\nprimary = { embedded = true }\n',
            "at most one deployment can be embedded",
        ),
        (
            '[[deployments]]\nmodel = "a"\nprimary = { urls = ["http://x"], embedded = true }\n',
            "either urls or",
        ),
        ("deployments = []", "at least 1"),
        (GOOD + 'guard = { fallback = "b" }\n', "the guard's fallback 'b' is not a deployment (have: a)"),
        (GOOD + 'guard = { fallback = "a" }\n', "the guard's fallback must be another deployment"),
        (
            '[[deployments]]\nmodel = "a"\nprimary = { urls = ["http://127.0.0.1:9"] }\n'
            'guard = { fallback = "b" }\n'
            '[[deployments]]\nmodel = "b"\nprimary = { urls = ["http://127.0.0.1:8"] }\n',
            "a guard acts on drift, which needs shadow scoring: give a reference",
        ),
        (GOOD + 'drift = { baseline = "missing.json" }\n', "cannot read the drift baseline"),
        (GOOD + "drift = { warmup = 1 }\n", "greater than or equal to 2"),
    ],
)
@pytest.mark.fast  # in process, no model
def test_bad_files_exit_2_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    result = run_cli_in_process("serve", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


@pytest.mark.fast  # in process, no model
def test_flag_combinations_that_make_no_sense(tmp_path: Path) -> None:
    result = run_cli_in_process("serve", "--reference", "http://127.0.0.1:10")
    assert result.returncode == 2 and "--reference needs --primary" in result.stderr
    result = run_cli_in_process(
        "serve", "--config", str(write(tmp_path, GOOD)), "--primary", "http://127.0.0.1:9"
    )
    assert result.returncode == 2 and "not both" in result.stderr
    result = run_cli_in_process("serve", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_an_embedded_and_an_http_deployment_in_one_proxy(tmp_path: Path) -> None:
    with fault_server("ok") as upstream:
        config = write(
            tmp_path,
            f"""
[[deployments]]
model = "local"
primary = {{ embedded = true, cache_type_k = "q8_0", cache_type_v = "q8_0" }}

[[deployments]]
model = "remote"
primary = {{ urls = ["{upstream.url}"] }}
""",
        )
        proxy = start_server("--config", str(config), "--ctx-size", "512")
        try:
            assert proxy.models == ["local", "remote"]
            with httpx.Client(base_url=proxy.base_url, timeout=60) as http:
                for model in ("local", "remote"):
                    r = http.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 2,
                        },
                    )
                    assert r.status_code == 200, r.text
                    assert r.json()["choices"][0]["message"]["content"]
                status = {d["name"]: d for d in http.get("/kvproxy/v1/status").json()["deployments"]}
            assert status["local"]["primary"] == {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
            assert status["local"]["estimator"] == "exact"
            assert status["remote"]["primary"] is None  # llama-server does not report; not declared
            assert upstream.posts == 1
        finally:
            stop_server(proxy)
