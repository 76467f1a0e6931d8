"""Exact-KLD throughput at Gemma's vocabulary against this machine's memory bandwidth, and the shadow
path's peak extra memory, measured side by side in one run.

    .venv/bin/python benchmarks/kld_throughput.py [--vocab 262144] [--chunks 1,8,32]

Bandwidth: numpy copying a 256 MiB float32 array (read + write counted), best of 5. The floor for
exact KLD is reading the two float32 logit rows once: 2 x 4 x V bytes per position, so
``bound = bandwidth / (8 V)`` positions/s. The ratio says how far the numpy implementation (several
float64 passes) is from that floor.

Memory: a child process loads Gemma 3 270M, creates the two scoring contexts and scores 600
positions; the peak RSS (VmHWM) above the level after loading is the shadow path's extra memory,
compared with the bound the scorer documents.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from kvproxy import kld
from kvproxy.kld import coarse_kld_row, exact_kld


def bandwidth_bytes_per_s() -> float:
    src = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def kld_positions_per_s(vocab: int, chunk: int, seconds: float = 3.0) -> float:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 4, (chunk, vocab)).astype(np.float32)
    pri = (ref + rng.normal(0, 0.3, ref.shape)).astype(np.float32)
    toks = rng.integers(0, vocab, chunk)
    exact_kld(ref, pri, toks)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        exact_kld(ref, pri, toks)
        n += chunk
    return n / (time.perf_counter() - start)


def exp_bound_positions_per_s(vocab: int, seconds: float = 2.0, fn: np.ufunc = np.exp) -> float:
    """The compute ceiling: exact KLD needs exp of both rows (2 V float32 exps per position); this
    times numpy's exp (or exp2, which the kernel uses) alone on one position's rows, one thread."""
    rows = np.random.default_rng(1).normal(-8, 4, (2, vocab)).astype(np.float32)
    out = np.empty_like(rows)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(rows, out=out)
        n += 1
    return n / (time.perf_counter() - start)


def topk_positions_per_s(k: int, seconds: float = 2.0) -> float:
    """The top-K path: one coarse-grained KL per position from two top-K lists (ids, logprobs)."""
    rng = np.random.default_rng(2)
    ids = rng.permutation(1000)[:k].tolist()
    other = [*ids[: k - 2], 5000, 5001]
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1))[:k]))[::-1].tolist()
    lq = [x - 0.05 for x in lp]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            coarse_kld_row(ids, lp, other, lq)
        n += 100
    return n / (time.perf_counter() - start)


MEMORY_CHILD = r"""
import json, sys
from kvproxy.backends.base import KVConfig
from kvproxy.scoring.embedded import EmbeddedScorer, scoring_chunk_bytes
from kvproxy.backends.embedded import bundled_model_path
from kvproxy.config import KVCacheType as T
import llama_cpp

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0][:-1], int(line.split()[1]) * 1024

chunk, n_ctx = int(sys.argv[1]), 1024
llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=n_ctx, type_k=2, type_v=2, flash_attn=True,
                      verbose=False, swa_full=False)
before = dict(hwm())
scorer = EmbeddedScorer(llm._model, primary=KVConfig(T.Q4_0, T.Q4_0), reference=KVConfig(T.F16, T.F16),
                        n_ctx=n_ctx, threads=2, flash_attn=True, chunk=chunk)
created = dict(hwm())
toks = list(range(1000, 1000 + 700))
scorer.score(toks[:100], toks[100:700])
after = dict(hwm())
print(json.dumps({"rss_loaded": before["VmRSS"], "peak_after_contexts": created["VmHWM"],
                  "peak_after_scoring": after["VmHWM"], "bound": scoring_chunk_bytes(chunk, scorer.n_vocab)}))
"""


def shadow_peak_memory(chunk: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(chunk)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--chunks", default="1,8,32")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]

    bw = bandwidth_bytes_per_s()
    floor = bw / (8 * args.vocab)
    print(f"memory bandwidth (numpy copy, read+write): {bw / 1e9:.2f} GB/s")
    print(
        f"bandwidth floor for exact KLD at V={args.vocab:,}: {floor:,.0f} positions/s"
        " (reading 2 float32 rows)\n"
    )
    threads = kld.KLD_THREADS
    for label, n_threads in ((f"{threads} threads (default)", threads), ("1 thread", 1)):
        kld.KLD_THREADS = n_threads
        print(f"exact KLD, {label}:")
        print(f"{'chunk':>6} {'positions/s':>12} {'ms/position':>12} {'of floor':>9}")
        for chunk in chunks:
            rate = kld_positions_per_s(args.vocab, chunk)
            print(f"{chunk:>6} {rate:>12,.0f} {1000 / rate:>12.2f} {rate / floor:>8.1%}")
        print()
    kld.KLD_THREADS = threads
    for name, fn in (("exp", np.exp), ("exp2", np.exp2)):
        ceiling = exp_bound_positions_per_s(args.vocab, fn=fn)
        print(
            f"compute ceiling: numpy {name} of the two rows alone, one thread: {ceiling:,.0f} positions/s"
            f" ({ceiling / floor:.1%} of the bandwidth floor)"
        )
    for k in (20, 100):
        print(f"top-K path (coarse KL from two top-{k} lists): {topk_positions_per_s(k):,.0f} positions/s")

    if not args.skip_memory:
        print(
            "\nshadow path peak extra memory"
            " (Gemma 3 270M, q4_0 primary vs f16 reference, n_ctx 1024, 600 positions)"
        )
        print(
            f"{'chunk':>6} {'contexts MiB':>13} {'scoring MiB':>12} {'total MiB':>10} {'chunk bound MiB':>16}"
        )
        for chunk in chunks:
            m = shadow_peak_memory(chunk)
            contexts = (m["peak_after_contexts"] - m["rss_loaded"]) / 2**20
            scoring = (m["peak_after_scoring"] - m["peak_after_contexts"]) / 2**20
            total = (m["peak_after_scoring"] - m["rss_loaded"]) / 2**20
            print(f"{chunk:>6} {contexts:>13.1f} {scoring:>12.1f} {total:>10.1f} {m['bound'] / 2**20:>16.1f}")


if __name__ == "__main__":
    main()
