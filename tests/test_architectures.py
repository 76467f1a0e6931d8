"""Every architecture users bring, served end to end: qwen35moe, qwen35, gemma3, gemma4 and a GQA llama.

For each tiny model (tests/arch_models.py), ``kvproxy serve``:

* answers the official openai client, streamed and not, chat and completions;
* shadow-scores every request (forced) with a finite KLD of the q4_0 primary against f16, and
  the score route scores the same job twice alike (no state left from one job in the next: the
  hybrid models keep a recurrent state);
* with an f16 primary, reads exactly 0 against the f16 reference;
* and ``kvproxy calibrate`` sweeps it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.arch_models import ARCHS, tiny_model
from tests.conftest import RunningServer, start_server, stop_server

FORCE = {"X-KVProxy-Shadow": "force"}


def _deployment(server: RunningServer) -> dict[str, Any]:
    status = httpx.get(f"{server.base_url}/kvproxy/v1/status", timeout=10).json()
    return dict(status["deployments"][0])


def _scored(server: RunningServer, n: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = _deployment(server)
        if d["shadow"]["scored"] >= n or time.monotonic() > deadline:
            return d
        time.sleep(0.2)


def _talk(server: RunningServer) -> list[int]:
    """A chat (non-streamed and streamed) and a completion; returns the completion's tokens."""
    client = OpenAI(base_url=server.v1, api_key="unused", default_headers=FORCE)
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage is not None
    assert out.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(
        model="tiny", prompt="The sea is", max_tokens=6, temperature=0, logprobs=1
    )
    assert done.choices[0].logprobs is not None
    return [int(t) for t in (done.usage.prompt_tokens, done.usage.completion_tokens)]  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ARCHS)
def test_serve_shadow_score_and_calibrate(arch: str, tmp_path: Path) -> None:
    path = tiny_model(arch)
    common = ("--model", str(path), "--alias", "tiny", "-c", "256", "--shadow-rate", "0", "--probe")

    server = start_server(*common)  # q4_0 K and V, scored against f16
    try:
        _talk(server)
        d = _scored(server, 3)
        assert d["shadow"]["scored"] == 3 and d["shadow"]["failed"] == 0, d["shadow"]
        kld = d["kld"]["since_start"]
        assert kld["tokens"] > 0 and math.isfinite(kld["mean"]) and kld["mean"] >= 0
        # the score route: the same job twice, the same numbers (each job starts from a clean state)
        job = {"prompt_tokens": list(range(1, 40)), "token_ids": list(range(40, 60))}
        first = httpx.post(f"{server.base_url}/kvproxy/v1/score", json=job, timeout=60).json()
        again = httpx.post(f"{server.base_url}/kvproxy/v1/score", json=job, timeout=60).json()
        assert first["kld"] == again["kld"] and first["p_ref"] == again["p_ref"]
        assert all(math.isfinite(x) and x >= 0 for x in first["kld"])
    finally:
        stop_server(server)

    server = start_server(*common, "-ctk", "f16", "-ctv", "f16")
    try:
        _talk(server)
        d = _scored(server, 3)
        assert d["shadow"]["scored"] == 3, d["shadow"]
        assert d["kld"]["since_start"]["max"] == 0.0  # f16 against f16: the same numbers exactly
    finally:
        stop_server(server)

    out = tmp_path / "calibration"
    sweep = ["--configs", "f16,q8_0,q4_0", "-c", "64", "--max-chunks", "1", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "kvproxy", "calibrate", "--model", str(path), *sweep],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = {r["config"]: r for r in json.loads((out / "calibration.json").read_text())["results"]}
    assert results["f16"]["mean_kld"] == 0.0
    assert all(math.isfinite(results[c]["mean_kld"]) for c in ("q8_0", "q4_0"))
