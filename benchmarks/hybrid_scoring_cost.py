"""What per-position llama-server scoring costs on a hybrid (recurrent) model, pinned and not.

A recurrent state (Qwen3.5/3.6) cannot be cut back one token, nor can a sliding-window cache beyond
its checkpoints: when llama-server has to answer a prefix shorter than what a slot holds, it
processes the prompt again from the start. kvproxy's per-position scorer (``LlamaServerReference``)
sends up to 32 prefixes in one ``/completion`` request; llama-server spreads them over its slots.
This measures, for the tiny qwen35moe (1 recurrent + 1 attention layer), gemma3 (sliding window) and
llama-dense (attention only) models of tests/arch_models.py (all three by test-llama-archs, with its
128-token vocabulary), on llama-server's default (4 slots, unified
KV) and with ``-np 1``:

* prompt tokens llama-server processed per scored position (its ``llamacpp:prompt_tokens_total``),
* milliseconds per position,
* and, for scale, milliseconds per generated token on the same server.

    .venv/bin/python benchmarks/hybrid_scoring_cost.py [--prompt 120] [--tokens 64]

Starts its own llama-servers on loopback (one thread each) and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.scoring.job import PrimaryReport
from kvproxy.scoring.llama_server import LlamaServerReference, _ServerState
from kvproxy.upstream.replicas import ReplicaPool, Timeouts
from tests.arch_models import tiny_model
from tests.llama_servers import start_llama_server


def prompt_tokens_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^llamacpp:prompt_tokens_total (\S+)$", text, re.M)
    assert m, "llama-server without --metrics?"
    return float(m.group(1))


async def score_once(url: str, prompt: list[int], report: PrimaryReport, pinned: bool) -> float:
    pool = ReplicaPool([url], Timeouts(5, 300, 600))
    try:
        ref = LlamaServerReference(pool, top_k=20)
        if not pinned:  # what kvproxy did before: no slot, prompts spread over the free slots
            ref._servers[pool.replicas[0].url] = _ServerState([], None)
        start = time.perf_counter()
        await ref.score(prompt, report)
        return time.perf_counter() - start
    finally:
        await pool.close()


def measure(arch: str, server_args: list[str], prompt_len: int, n: int, log_dir: Path) -> list[str]:
    srv = start_llama_server(tiny_model(arch), log_dir, "-c", "4096", "--metrics", *server_args)
    try:
        rng = random.Random(0)
        prompt = [rng.randrange(3, 128) for _ in range(prompt_len)]
        gen = httpx.post(
            f"{srv.url}/completion",
            json={"prompt": prompt, "n_predict": n, "n_probs": 20, "temperature": 0, "cache_prompt": False},
            timeout=300,
        ).json()
        per_token = gen["timings"]["predicted_ms"] / max(1, gen["timings"]["predicted_n"])
        report = PrimaryReport(
            token_ids=[int(p["id"]) for p in gen["completion_probabilities"]],
            token_logprobs=[float(p["logprob"]) for p in gen["completion_probabilities"]],
            top_ids=[[int(t["id"]) for t in p["top_logprobs"]] for p in gen["completion_probabilities"]],
            top_logprobs=[
                [float(t["logprob"]) for t in p["top_logprobs"]] for p in gen["completion_probabilities"]
            ],
        )
        rows = []
        for pinned in (False, True):
            before = prompt_tokens_total(srv.url)
            seconds = asyncio.run(score_once(srv.url, prompt, report, pinned))
            processed = prompt_tokens_total(srv.url) - before
            k = len(report.token_ids)
            rows.append(
                f"| {arch} | {' '.join(server_args) or 'default (4 slots, unified)'} | "
                f"{'pinned' if pinned else 'spread'} | {processed / k:.1f} | {1000 * seconds / k:.2f} | "
                f"{per_token:.2f} |"
            )
        return rows
    finally:
        srv.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=120)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    print(f"{a.prompt}-token prompt, {a.tokens} scored positions, 32 prefixes a request")
    print(
        "| model | llama-server | slots | prompt tokens / position | ms / position | ms / generated token |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("qwen35moe", "gemma3", "llama-dense"):
            for args in ([], ["-np", "1"]):
                for row in measure(arch, args, a.prompt, a.tokens, Path(tmp)):
                    print(row, flush=True)


if __name__ == "__main__":
    main()
