"""Served vs replay under ``--parallel``: how far batched slots move the numerics a client was served.

    .venv/bin/python benchmarks/parallel_divergence.py [--parallel 1 2 4] [--requests 8] [--tokens 32]
        [--cache-type q4_0] [--n-gpu-layers N] [--top 20]

For each ``--parallel`` N, the embedded backend serves ``--requests`` greedy completions at once
(English prompts of different lengths, so prompt fills share batches with running streams), each
with the top-``--top`` logprobs of every position. Each is then replayed on the decode path, single
stream, as the shadow scorer replays it (kvproxy/scoring/embedded.py, with the served ids as
``check_ids``), and the served logprobs are compared with the replay's on the same tokens:

* ``max_abs``, ``mean_abs``: |served - replayed| logprob over every served entry;
* ``served_kl``: the mean per-position coarse KL(served top-K || replay), as the
  ``kvproxy_served_divergence`` metric computes it for a scoring server;
* ``exact_rows``: the fraction of positions whose served entries equal the replay bit for bit;
* ``same_text``: the fraction of completions equal to what ``--parallel 1`` served (greedy), i.e.
  how often batching changed the tokens themselves.

With N = 1 the replay must reproduce the served rows exactly on a CPU (tests/test_decode_path.py).
Prints one JSON line per N and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from kvproxy.backends.base import (
    Finished,
    GenerationRequest,
    KVConfig,
    SamplingParams,
    TokenLogprob,
)
from kvproxy.backends.embedded import EmbeddedBackend, bundled_model_path
from kvproxy.config import KVCacheType, Settings
from kvproxy.corpus import english_text
from kvproxy.kld import coarse_kld_row
from kvproxy.model.gguf_info import read_model_info
from kvproxy.scoring.embedded import make_scorer
from kvproxy.serving.openai_format import collect

F16 = KVConfig(KVCacheType.F16, KVCacheType.F16)


def prompts(backend: EmbeddedBackend, n: int) -> list[list[int]]:
    words = english_text().split()
    out = []
    for i in range(n):
        length = 30 + (i * 97) % 220  # 30 to 250 words: fills of different lengths
        start = (i * 331) % (len(words) - length)
        out.append(backend.tokenize(" ".join(words[start : start + length]), add_bos=True))
    return out


async def serve_all(
    backend: EmbeddedBackend, jobs: list[list[int]], tokens: int, top: int
) -> list[tuple[list[TokenLogprob], Finished]]:
    async def one(prompt: list[int]) -> tuple[list[TokenLogprob], Finished]:
        request = GenerationRequest(
            prompt, max_tokens=tokens, sampling=SamplingParams(temperature=0.0), top_logprobs=top
        )
        got = await collect(backend.generate(request))
        return got.logprobs, got.done

    return list(await asyncio.gather(*(one(p) for p in jobs)))


def measure(args: argparse.Namespace, parallel: int) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    path = bundled_model_path()
    settings = Settings(
        model=path,
        ctx_size=1024,
        threads=args.threads,
        shadow_rate=0,
        parallel=parallel,
        max_queue=args.requests,
        queue_timeout=0,
        cache_type_k=KVCacheType(args.cache_type),
        cache_type_v=KVCacheType(args.cache_type),
        n_gpu_layers=args.n_gpu_layers,
    )
    backend = EmbeddedBackend(settings, read_model_info(path))
    jobs: list[list[int]] = []
    try:
        # tokenizing needs the model: load and tokenize first, then serve every request at once
        async def load_and_prompts() -> None:
            await backend.load()
            jobs.extend(prompts(backend, args.requests))

        asyncio.run(load_and_prompts())
        start = time.perf_counter()
        served = asyncio.run(serve_all(backend, jobs, args.tokens, args.top))
        wall = time.perf_counter() - start
        scorer = make_scorer(backend, F16, path="decode")
        diffs: list[float] = []
        kls: list[float] = []
        exact = positions = 0
        for prompt, (entries, done) in zip(jobs, served, strict=True):
            check = [[e.token_id, *(t.token_id for t in e.top)] for e in entries]
            got = scorer.score(prompt, list(done.token_ids), check).check_logprobs or []
            for e, replayed in zip(entries, got, strict=False):
                want = [e.logprob, *(t.logprob for t in e.top)]
                d = np.abs(np.asarray(want) - np.asarray(replayed))
                diffs.extend(d.tolist())
                exact += int(bool((d == 0).all()))
                positions += 1
                ids = [t.token_id for t in e.top]
                kls.append(coarse_kld_row(ids, want[1:], ids, replayed[1:]))
        scorer.close()
    finally:
        backend.close()
    texts = [tuple(done.token_ids) for _, done in served]
    return {
        "parallel": parallel,
        "cache_type": args.cache_type,
        "requests": args.requests,
        "positions": positions,
        "max_abs": max(diffs) if diffs else None,
        "mean_abs": float(np.mean(diffs)) if diffs else None,
        "served_kl": float(np.mean(kls)) if kls else None,
        "exact_rows": exact / positions if positions else None,
        "serve_wall_s": round(wall, 2),
    }, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--cache-type", default="q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    args = ap.parse_args()
    rows = []
    baseline: list[tuple[int, ...]] | None = None
    for n in args.parallel:
        row, texts = measure(args, n)
        if baseline is None and n == 1:
            baseline = texts
        if baseline is not None:
            row["same_text"] = sum(a == b for a, b in zip(texts, baseline, strict=True)) / len(texts)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "\n| --parallel | positions | max abs Δ logprob | mean abs Δ | served KL (top-20) | rows bit-exact |"
        " completions as with 1 slot |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['parallel']} | {r['positions']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
            f"{r['served_kl']:.3g} | {r['exact_rows']:.0%} | {r.get('same_text', float('nan')):.0%} |"
        )


if __name__ == "__main__":
    main()
