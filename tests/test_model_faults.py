"""Models llama.cpp cannot serve: a clear exit 2 at start-up, never a dead server.

* llama.cpp aborts the process on a failed ``GGML_ASSERT`` (here: a Qwen3.5 MoE asking for more
  experts per token than it has) and cannot be caught in Python. ``kvproxy serve`` first loads the
  model, generates and scores in a child process (kvproxy.deployments.probe): the child dies, and
  start-up ends with exit 2 and llama.cpp's own reason, one line on stderr.
* A file llama.cpp refuses without aborting (an unknown architecture) gets the same one line.
* The tiny test-llama-archs models have no BOS and no EOS (llama.cpp answers -1): asking llama.cpp
  for the text of token -1 threw ``std::out_of_range`` through its C API and aborted kvproxy at
  start-up or at the first request. Served now, they answer, and token ids at and past the edge of
  the vocabulary get a 400, with the server alive after all of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.arch_models import rewritten, tiny_model
from tests.conftest import start_server, stop_server


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvproxy", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("assert", "GGML_ASSERT(n_expert_used_max <= hparams.n_expert) failed"),
        ("architecture", "unknown model architecture: 'nonesuch'"),
    ],
)
def test_a_gguf_llama_cpp_cannot_serve_exits_2_with_its_reason(
    case: str, reason: str, tmp_path: Path
) -> None:
    bad = tmp_path / f"{case}.gguf"
    if case == "assert":
        rewritten(tiny_model("qwen35moe"), bad, {"qwen35moe.expert_used_count": 4})
    else:
        rewritten(tiny_model("llama"), bad, {}, architecture="nonesuch")
    result = _serve("--model", str(bad), "-c", "256")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"kvproxy: error: llama.cpp cannot serve {bad}: {reason}"]
    assert "ready:" not in result.stdout


def test_a_model_without_bos_or_eos_is_served_and_the_server_survives() -> None:
    path = tiny_model("qwen35moe")
    server = start_server(
        "--model", str(path), "--alias", "tiny", "-c", "256", "--shadow-rate", "1", "--probe"
    )
    try:
        with httpx.Client(base_url=server.v1, timeout=60) as client:
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
            assert client.post("/chat/completions", json=chat).status_code == 200
            ok = client.post("/completions", json={"model": "tiny", "prompt": [0, 127], "max_tokens": 2})
            assert ok.status_code == 200
            for ids in ([128], [2**31 - 1]):
                r = client.post("/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 2})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            r = client.post("/chat/completions", json={**chat, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert server.process.poll() is None
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    finally:
        stop_server(server)
