"""Embedded default: what exact shadow scoring costs the clients of the same process, side by side.

Starts ``kvproxy serve`` on the bundled Gemma 3 270M (q4_0 KV, shadow rate 0) and sends the same
greedy requests, one at a time, in alternating rounds: unshadowed, then with
``X-KVProxy-Shadow: force`` so every request is scored on the f16 reference while the next ones are
generated. Before each round the shadow queue is drained, so an unshadowed round runs on a calm
machine. Scoring and generation share the CPU (llama.cpp threads on both cores); the scorer's thread
runs in the SCHED_IDLE class (``kvproxy.priority``), and this measures what is left.

    .venv/bin/python benchmarks/embedded_shadow_cost.py [--rounds 3] [--requests 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_overhead import PY, free_port

from kvproxy.corpus import english_text


def shadow(url: str) -> dict[str, Any]:
    d = httpx.get(f"{url}/kvproxy/v1/status", timeout=30).json()["deployments"][0]
    return d["shadow"]  # type: ignore[no-any-return]


def drain(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        s = shadow(url)
        if s["queued"] == 0 and s["in_flight"] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"shadow queue did not drain: {s}")
        time.sleep(0.2)


def wait_ready(client: httpx.Client, timeout: float = 300) -> None:
    """Until /health says ok (the model is loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("kvproxy did not become ready")


def one_round(
    client: httpx.Client, model: str, prompts: list[str], max_tokens: int, force: bool
) -> list[float]:
    """Seconds per generated token of each request (request latency / completion tokens)."""
    out = []
    headers = {"X-KVProxy-Shadow": "force"} if force else {}
    for text in prompts:
        t = time.perf_counter()
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
            headers=headers,
        )
        elapsed = time.perf_counter() - t
        r.raise_for_status()
        out.append(elapsed / max(1, r.json()["usage"]["completion_tokens"]))
    return out


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=60)
    args = ap.parse_args()
    words = english_text().split()
    prompts = [" ".join(words[i * 97 : i * 97 + args.prompt_words]) for i in range(args.requests)]
    tmp = Path(tempfile.mkdtemp(prefix="kvproxy-embedded-shadow-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [PY, "-m", "kvproxy", "serve", "--port", str(port), "--ctx-size", "1024", "--shadow-rate", "0",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=(tmp / "kvproxy.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            wait_ready(client)
            model = client.get("/v1/models").json()["data"][0]["id"]
            one_round(client, model, prompts[:2], args.max_tokens, False)  # warm-up
            per_token: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for force in (False, True):
                    drain(url)
                    per_token[force] += one_round(client, model, prompts, args.max_tokens, force)
            drain(url)
            s = shadow(url)
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        f"Gemma 3 270M embedded, q4_0 KV, {args.requests} requests a round x {args.rounds} rounds, "
        f"{args.max_tokens} tokens max, one at a time; scored {s['scored']} of {s['sampled']} forced\n"
    )
    print("| requests | ms per token p50 | p90 | max |")
    print("|---|---|---|---|")
    for force, name in ((False, "unshadowed"), (True, "each one scored exactly (shadow forced)")):
        v = [1e3 * x for x in per_token[force]]
        print(f"| {name} | {statistics.median(v):.2f} | {quantile(v, 0.9):.2f} | {max(v):.2f} |")
    base, shadowed = statistics.median(per_token[False]), statistics.median(per_token[True])
    print(f"\nshadowed / unshadowed, p50: {shadowed / base:.2f}x")


if __name__ == "__main__":
    main()
