"""Embedded backend: teacher-forced reference scoring against generation, per token, in one run.

Loads the bundled Gemma 3 270M once, generates ``--tokens`` tokens greedily after a prompt of
English text (q4_0 K/V, flash attention, one decode per token), then scores exactly those tokens the
way the shadow path does (``EmbeddedScorer``: the q4_0 and f16 contexts on the same weights, prompt
prefilled, generated tokens teacher-forced in chunks, exact KLD over the full vocabulary).

    .venv/bin/python benchmarks/embedded_scoring_cost.py [--tokens 64] [--prompt-words 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import bundled_model_path
from kvproxy.backends.embedded_scorer import EmbeddedScorer
from kvproxy.config import KVCacheType as T
from kvproxy.corpus import english_text


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = llama_cpp.Llama(
        str(bundled_model_path()), n_ctx=2048, type_k=2, type_v=2, flash_attn=True,
        n_threads=args.threads, verbose=False,
    )  # fmt: skip
    text = " ".join(english_text().split()[: args.prompt_words])
    prompt = llm.tokenize(text.encode(), add_bos=True)
    scorer = EmbeddedScorer(
        llm._model, primary=KVConfig(T.Q4_0, T.Q4_0), reference=KVConfig(T.F16, T.F16),
        n_ctx=2048, threads=args.threads, flash_attn=True, chunk=8,
    )  # fmt: skip
    gen_per_token, prefill, score_per_token = [], [], []
    for _ in range(args.repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(args.tokens):
            tok = llm.sample(temp=0.0)
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        scorer.score(prompt, out)
        t3 = time.perf_counter()
        prefill.append((t1 - t0) / len(prompt))
        gen_per_token.append((t2 - t1) / args.tokens)
        score_per_token.append((t3 - t2) / args.tokens)
    scorer.close()
    g, s, p = min(gen_per_token), min(score_per_token), min(prefill)
    print(
        f"Gemma 3 270M, {len(prompt)} prompt tokens, {args.tokens} generated, "
        f"{args.threads} threads, best of {args.repeats}"
    )
    print("| step | ms per token |")
    print("|---|---|")
    print(f"| generation (q4_0 KV, one decode per token) | {1e3 * g:.1f} |")
    print(f"| prompt prefill (for scale) | {1e3 * p:.2f} |")
    print(f"| reference scoring, exact KLD (q4_0 + f16 contexts, prompt included) | {1e3 * s:.1f} |")
    print(f"\nscoring / generation = {s / g:.2f}")


if __name__ == "__main__":
    main()
