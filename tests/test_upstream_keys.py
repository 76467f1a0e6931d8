"""Upstreams that want a key: a llama-server started with --api-key as the primary, and a
`kvproxy backend --api-key` as the exact reference. The key comes from an environment variable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_runner import run_cli_in_process
from tests.conftest import start_server, stop_server
from tests.llama_servers import llama_servers

PRIMARY_KEY, BACKEND_KEY = "sk-llama-primary-1", "sk-kvproxy-backend-2"


def test_keyed_primary_and_keyed_scoring_backend(gemma_path: Path, tmp_path: Path) -> None:
    with llama_servers(
        gemma_path, tmp_path, ("-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "--api-key", PRIMARY_KEY)
    ) as (q4,):
        backend = start_server(
            "-ctk", "q4_0", "-ctv", "q4_0", "--ctx-size", "1024", "--api-key", BACKEND_KEY, command="backend"
        )
        config = tmp_path / "keys.toml"
        config.write_text(f"""
[[deployments]]
model = "keyed"
shadow_rate = 0
primary = {{ urls = ["{q4.url}"], cache_type_k = "q4_0", api_key_env = "T_PRIMARY_KEY" }}
reference = {{ urls = ["{backend.base_url}"], api_key_env = "T_BACKEND_KEY" }}

[[deployments]]
model = "keyless"
shadow_rate = 0
primary = {{ urls = ["{q4.url}"], cache_type_k = "q4_0", cache_type_v = "q4_0" }}
reference = {{ urls = ["{backend.base_url}"] }}
""")
        proxy = start_server(
            "--config", str(config), env={"T_PRIMARY_KEY": PRIMARY_KEY, "T_BACKEND_KEY": BACKEND_KEY}
        )
        try:
            with httpx.Client(
                base_url=proxy.base_url, timeout=120, headers={"X-KVProxy-Shadow": "force"}
            ) as http:

                def chat(model: str) -> httpx.Response:
                    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
                    return http.post("/v1/chat/completions", json={**body, "max_tokens": 8})

                assert chat("keyed").status_code == 200
                refused = chat(
                    "keyless"
                )  # the upstream's 401 is its answer to the proxy, not the client's fault
                assert refused.status_code == 502, refused.text
                assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
                deadline = time.monotonic() + 120
                while True:
                    st = {d["name"]: d for d in http.get("/kvproxy/v1/status").json()["deployments"]}
                    if st["keyed"]["shadow"]["scored"] == 1:
                        break
                    assert st["keyed"]["shadow"]["failed"] == 0, st["keyed"]["shadow"]
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert st["keyed"]["estimator"] == "exact"
        finally:
            stop_server(proxy)
            stop_server(backend)
    log = "".join(proxy.output) + "".join(backend.output)
    assert PRIMARY_KEY not in log and BACKEND_KEY not in log


@pytest.mark.fast  # in process, no model
def test_an_unset_key_variable_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text("""
[[deployments]]
model = "m"
primary = { urls = ["http://127.0.0.1:9"], api_key_env = "T_SURELY_UNSET_KEY" }
""")
    result = run_cli_in_process("serve", "--config", str(config))
    assert result.returncode == 2
    assert "T_SURELY_UNSET_KEY is not set" in result.stderr
