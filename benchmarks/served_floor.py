"""Through llama-server: top-K against exact on the same tokens, and the floor that batching adds.

    python3 benchmarks/served_floor.py [--n-gpu-layers 99] [--requests 8] [--tokens 64]

Starts, on loopback, a primary llama-server per case (``-np 8``, so one stream or eight run on the
same server), an f16 llama-server reference (``-np 1 --swa-full``: what kvproxy's per-position top-K
scoring asks), and a kvproxy scoring server (``kvproxy backend --score-path decode``) holding the
primary's KV config and f16 on the same weights. Greedy completions of English prompts are asked of
the primary, with its top-20 logprobs, one at a time (load 1) or all at once (load 8); every
response is then scored by kvproxy's own scorers, as the proxy would score it:

* top-20: the f16 llama-server's top-20 per position against the primary's served top-20;
* exact: the scoring server replays both configs one token a step (decode path) over the full
  vocabulary; the replay is single-stream, so it never sees how the primary's batch was computed;
* served vs replay: the coarse KL between what the primary served (its top-20) and the scoring
  server's replay of the same config. With an f16 primary this is the floor that batching adds
  (the config itself costs exactly 0 there); with one stream it is the gap between two builds of
  llama.cpp's numerics on the same device (0 when they match).

Prints a table; writes served_floor.json to $OUT when that is set. Figures: docs/production.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores
from kvproxy.scoring.job import PrimaryReport
from kvproxy.scoring.llama_server import LlamaServerReference, prompt_tokens_text
from kvproxy.scoring.prompt_fill import PromptFill
from kvproxy.scoring.score_client import ScoreRouteReference, probe_score_route
from kvproxy.upstream.replicas import ReplicaPool, Timeouts
from tests.conftest import start_server, stop_server
from tests.llama_servers import llama_servers

TOP_K = 20


def prompts(n: int, words: int = 60) -> list[str]:
    text = english_text().split()
    return [" ".join(text[i * 131 : i * 131 + words]) for i in range(n)]


async def complete(http: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> PrimaryReport:
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "logprobs": TOP_K,
        "cache_prompt": False,
    }
    r = await http.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    data = r.json()
    report = PrimaryReport()
    choice = data["choices"][0]
    lp = choice.get("logprobs") or {}
    report.add(lp.get("content") or [])
    report.note_end(data)
    return report


async def case(
    primary_url: str, f16_url: str, scorer_url: str, load: int, n: int, tokens: int, one_call: bool
) -> dict[str, Any]:
    t = Timeouts()
    primary, f16, scorer = (ReplicaPool([u], t) for u in (primary_url, f16_url, scorer_url))
    info = await probe_score_route(scorer)
    assert info is not None, "the scoring server did not answer /kvproxy/v1/info"
    # the replay cuts the prompt as llama-server (its defaults, started below) did, unless asked not to
    exact_ref = ScoreRouteReference(scorer, info, prompt_fill=None if one_call else PromptFill())
    topk_ref = LlamaServerReference(f16, top_k=TOP_K)
    texts = prompts(n)
    async with httpx.AsyncClient(timeout=600) as http:
        reports: list[PrimaryReport] = []
        start = time.monotonic()
        for i in range(0, n, load):  # `load` requests in flight at once
            reports += await asyncio.gather(
                *(complete(http, primary_url, p, tokens) for p in texts[i : i + load])
            )
        elapsed = time.monotonic() - start
    top, exact, served = [], [], []
    for text, report in zip(texts, reports, strict=True):
        prompt = await prompt_tokens_text(primary, text)
        top.append(await topk_ref.score(prompt, report))
        scores = await exact_ref.score(prompt, report)
        exact.append(scores)
        if scores.served_divergence is not None:
            served += [float(x) for x in scores.served_divergence if x == x]  # NaN: nothing to compare
    for pool in (primary, f16, scorer):
        await pool.close()
    top_all, exact_all = PositionScores.concat(top), PositionScores.concat(exact)
    return {
        "load": load,
        "requests": n,
        "tokens": len(exact_all),
        "generation_seconds": elapsed,
        "top20_mean": float(np.mean(top_all.kld)),
        "exact_mean": float(np.mean(exact_all.kld)),
        "exact_same_top": float(np.mean(exact_all.same_top)),
        "served_vs_replay_mean": float(np.mean(served)) if served else None,
        "served_vs_replay_p99": float(np.percentile(served, 99)) if served else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--configs", default="q4_0,q8_0,f16")
    parser.add_argument("--slots", type=int, default=8, help="the primary llama-server's -np")
    parser.add_argument("--loads", default="1,8", help="streams at once, comma-separated")
    parser.add_argument(
        "--one-call-replay",
        action="store_true",
        help="replay the prompt in one call instead of llama-server's checkpoint cuts (to show the gap)",
    )
    args = parser.parse_args()
    model = args.model or bundled_model_path()
    ngl = ["-ngl", str(args.n_gpu_layers)]
    logs = Path(tempfile.mkdtemp(prefix="served-floor-"))
    rows: list[dict[str, Any]] = []
    for kv in args.configs.split(","):
        kv_flags = ["-ctk", kv, "-ctv", kv]
        backend = start_server(
            "--model", str(model), *kv_flags, "--score-path", "decode",
            "--n-gpu-layers", str(args.n_gpu_layers), "--ctx-size", "2048", command="backend", timeout=300,
        )  # fmt: skip
        try:
            with llama_servers(
                model,
                logs,
                ("-np", str(args.slots), "-c", str(args.slots * 2048), "-fa", "on", *kv_flags, *ngl),
                ("-np", "1", "--swa-full", "-fa", "on", *ngl),
            ) as (primary, f16):
                for load in (int(x) for x in args.loads.split(",")):
                    row = asyncio.run(
                        case(
                            primary.url,
                            f16.url,
                            backend.base_url,
                            load,
                            args.requests,
                            args.tokens,
                            args.one_call_replay,
                        )
                    )
                    row["config"], row["slots"] = kv, args.slots
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop_server(backend)
    print(
        f"\nGemma 3 270M via llama-server, -ngl {args.n_gpu_layers}, {args.requests} greedy "
        f"completions of {args.tokens} tokens; primary -np {args.slots}; kvproxy's scores (mean KLD a token)"
    )
    print(
        "| primary KV | streams at once | top-20 (f16 llama-server) | exact, decode path (kvproxy backend) "
        "| top-20 / exact | served vs replay (mean / p99) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['top20_mean'] / r['exact_mean']:.2f}" if r["exact_mean"] else "-"
        served = (
            f"{r['served_vs_replay_mean']:.4f} / {r['served_vs_replay_p99']:.4f}"
            if r["served_vs_replay_mean"] is not None
            else "-"
        )
        cells = [
            r["config"],
            str(r["load"]),
            f"{r['top20_mean']:.4f}",
            f"{r['exact_mean']:.4f}",
            ratio,
            served,
        ]
        print("| " + " | ".join(cells) + " |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "served_floor.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
