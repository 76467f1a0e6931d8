"""Upstreams that want a key: a llama-server started with --api-key as the primary, and a
`kvproxy backend --api-key` as the exact reference. The key comes from an environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_runner import run_cli_in_process
from tests.conftest import start_server, stop_server, wait_for
from tests.llama_servers import llama_servers

PRIMARY_KEY, BACKEND_KEY = "sk-llama-primary-1", "sk-kvproxy-backend-2"


def ended(shadow: dict[str, int]) -> int:
    """Shadow jobs that came to an end: scored, dropped or failed."""
    return shadow["scored"] + shadow["dropped"] + shadow["failed"]


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

                def keyed() -> dict[str, Any]:
                    deployments = http.get("/kvproxy/v1/status").json()["deployments"]
                    return next(d for d in deployments if d["name"] == "keyed")

                # the forced job is scored through the keyed backend. Once, in a full run, it ended in
                # none of the counters within 120 s (cause not established). One explanation: a forced
                # job is still dropped, and counted, when the proxy's loop stays saturated past the
                # shadow's deferral (2 s, kvproxy.shadow.pool), which polling `scored` alone waits out.
                # A drop is not the keys' fault: chat again; anything else fails with the counters.
                before = 0  # the deployment shadows nothing but forced requests, and this was the first
                for attempt in range(3):
                    assert wait_for(lambda b=before: ended(keyed()["shadow"]) > b, 120), keyed()["shadow"]
                    now = keyed()
                    assert now["shadow"]["failed"] == 0, now["shadow"]  # both keys reached their upstreams
                    if now["shadow"]["scored"] == 1:
                        break
                    print(f"shadow job dropped (attempt {attempt + 1}): {now['shadow']}")
                    before = ended(now["shadow"])
                    assert chat("keyed").status_code == 200
                else:
                    raise AssertionError(f"3 forced jobs dropped: {now['shadow']}")
                assert now["estimator"] == "exact"
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
