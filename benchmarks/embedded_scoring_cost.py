"""Embedded backend: what exact scoring costs against generation, and why the scorer replays the primary.

Loads the bundled Gemma 3 270M once. For each primary KV type and each of ``--prompts`` English
prompts, it generates ``--tokens`` tokens greedily in a context of that type (prompt in one batch,
then one decode per token: the path llama-cpp-python and llama-server take), keeping every
position's logits row. Then it scores exactly those tokens three ways against an f16 reference:

* **served**: the reference follows the generation's own path (prompt in one batch, then one token
  per decode) and is compared with the rows the primary generated from. This is the KLD a user of
  the deployment meets, and it costs the reference a full generation.
* **replay** (what kvproxy does, ``EmbeddedScorer``): both configs teacher-forced in chunks of
  ``--chunk`` positions, the prompt prefilled without logits.
* **kept rows**: the primary's generation-time rows against the chunked reference, the shortcut
  that would skip the primary's replay.

The first table times the steps per generated token (q4_0); the second gives mean KLDs and, for an
f16 primary, shows what each method reads when the two configs are identical (0 is right).

    .venv/bin/python benchmarks/embedded_scoring_cost.py [--tokens 64] [--prompts 3] [--chunk 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import bundled_model_path
from kvproxy.config import KVCacheType as T
from kvproxy.corpus import english_text
from kvproxy.kld import exact_kld
from kvproxy.scoring.embedded import EmbeddedScorer

Rows = np.ndarray[Any, np.dtype[np.float32]]


def generate(s: EmbeddedScorer, ctx: Any, prompt: list[int], n: int) -> tuple[list[int], Rows, float]:
    """Greedy generation on the decode path; returns the tokens, their rows and the decode seconds."""
    ctx.kv_cache_clear()
    s._decode(ctx, prompt, 0, with_logits=False)  # logits for the last prompt token only
    rows = np.empty((n, s.n_vocab), dtype=np.float32)
    tokens: list[int] = []
    start = time.perf_counter()
    for i in range(n):
        rows[i] = s._logits(ctx, 1)[0]
        tokens.append(int(rows[i].argmax()))
        if i + 1 < n:
            s._decode(ctx, [tokens[-1]], len(prompt) + i, with_logits=True)
    return tokens, rows, time.perf_counter() - start


def forced_on_decode_path(s: EmbeddedScorer, ctx: Any, prompt: list[int], tokens: Sequence[int]) -> Rows:
    """The rows a context computes for ``tokens`` fed one decode at a time after the whole prompt."""
    ctx.kv_cache_clear()
    s._decode(ctx, prompt, 0, with_logits=False)
    rows = np.empty((len(tokens), s.n_vocab), dtype=np.float32)
    for i in range(len(tokens)):
        rows[i] = s._logits(ctx, 1)[0]
        if i + 1 < len(tokens):
            s._decode(ctx, [tokens[i]], len(prompt) + i, with_logits=True)
    return rows


def forced_in_chunks(s: EmbeddedScorer, ctx: Any, prompt: list[int], tokens: Sequence[int]) -> Rows:
    """The rows the scorer's chunked teacher forcing computes (prompt prefilled without logits)."""
    seq, start = list(prompt) + list(tokens[:-1]), len(prompt) - 1
    ctx.kv_cache_clear()
    s._decode(ctx, seq[:start], 0, with_logits=False)
    parts = []
    for c in range(start, len(seq), s.chunk):
        part = seq[c : c + s.chunk]
        s._decode(ctx, part, c, with_logits=True)
        parts.append(s._logits(ctx, len(part)).copy())
    return np.concatenate(parts)


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=16, n_threads=args.threads, verbose=False)
    words = english_text().split()
    prompts = [
        llm.tokenize(" ".join(words[i * 300 : i * 300 + args.prompt_words]).encode(), add_bos=True)
        for i in range(args.prompts)
    ]
    n_ctx = max(len(p) for p in prompts) + args.tokens + 8
    timing: dict[str, list[float]] = {}
    kld: dict[str, dict[str, list[float]]] = {}
    for kv in (T.Q4_0, T.Q8_0, T.F16):
        s = EmbeddedScorer(
            llm._model, primary=KVConfig(kv, kv), reference=KVConfig(T.F16, T.F16),
            n_ctx=n_ctx, threads=args.threads, flash_attn=True, chunk=args.chunk,
        )  # fmt: skip
        means = kld[kv.value] = {"served": [], "replay": [], "kept": []}
        for prompt in prompts:
            tokens, kept, gen_s = generate(s, s._ctx_primary, prompt, args.tokens)
            served_ref = forced_on_decode_path(s, s._ctx_reference, prompt, tokens)
            t0 = time.perf_counter()
            replay = s.score(prompt, tokens)
            t1 = time.perf_counter()
            chunk_ref = forced_in_chunks(s, s._ctx_reference, prompt, tokens)
            t2 = time.perf_counter()
            kept_vs_chunk = exact_kld(chunk_ref, kept, tokens)
            t3 = time.perf_counter()
            means["served"].append(float(exact_kld(served_ref, kept, tokens).kld.mean()))
            means["replay"].append(float(replay.kld.mean()))
            means["kept"].append(float(kept_vs_chunk.kld.mean()))
            if kv is T.Q4_0:
                n = len(tokens)
                for name, secs in (
                    ("generation", gen_s), ("scoring", t1 - t0), ("reference", t2 - t1), ("kld", t3 - t2),
                ):  # fmt: skip
                    timing.setdefault(name, []).append(secs / n)
        s.close()

    def ms(name: str) -> float:
        return 1e3 * min(timing[name])

    gen, score, ref, kl = ms("generation"), ms("scoring"), ms("reference"), ms("kld")
    lengths = ", ".join(str(len(p)) for p in prompts)
    print(
        f"Gemma 3 270M, prompts of {lengths} tokens, {args.tokens} generated each, chunk {args.chunk}, "
        f"{args.threads} threads; times are the best over the prompts, per generated token\n"
    )
    print("| step (q4_0 primary, f16 reference) | ms per token | of generation |")
    print("|---|---|---|")
    rows = [
        ("generation (one decode per token)", gen),
        ("exact scoring as kvproxy does it (both configs replayed)", score),
        ("  of which the reference pass (prompt prefill + chunked logits)", ref),
        ("  of which the primary's replay (the rest)", score - ref - kl),
        ("  of which the exact KLD", kl),
    ]
    for name, value in rows:
        print(f"| {name} | {value:.2f} | {value / gen:.2f}x |")
    print(
        "\n| primary KV | served (both on the decode path) | replay (kvproxy)"
        " | kept rows vs chunked reference |\n|---|---|---|---|"
    )
    for kv_name, m in kld.items():
        cells = " | ".join(f"{np.mean(m[k]):.5f}" for k in ("served", "replay", "kept"))
        print(f"| {kv_name} | {cells} |")


if __name__ == "__main__":
    main()
