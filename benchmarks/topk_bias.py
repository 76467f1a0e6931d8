"""How far a top-K KLD estimate reads below the exact KLD, on real Gemma 3 270M logits.

    .venv/bin/python benchmarks/topk_bias.py [--ks 5,20,50,100] [--chunks 3]

Same positions as llama-perplexity: the bundled English text (the Gemma Terms of Use shipped in
the model package) in 512-token chunks, the second half of each chunk scored. For each KV config
the full-vocabulary rows of an f16-KV reference and of the config are computed on the same tokens;
then the exact KLD, and the coarse-grained estimates (known tokens plus one "rest" bucket):

* both top-K: both sides report only their top K (two llama-servers with logprobs / n_probs);
* full ref: the reference's full distribution, the primary's top K (an exact-scoring reference).

Prints mean exact KLD, mean estimate and estimate / exact (1 - that ratio is how low it reads).
"""

from __future__ import annotations

import argparse

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import bundled_model_path
from kvproxy.config import KVCacheType as T
from kvproxy.kld import coarse_kld_row, exact_kld, log_softmax
from kvproxy.scoring.embedded import EmbeddedScorer


def english_tokens(llm: object) -> list[int]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kvproxy.corpus import english_text

    return llm.tokenize(english_text().encode(), add_bos=True)  # type: ignore[attr-defined, no-any-return]


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", default="5,20,50,100")
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--configs", default="q8_0,q4_0")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    n_ctx, first = 512, 256

    llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=64, verbose=False)
    tokens = english_tokens(llm)
    print(f"text: {len(tokens)} tokens; scoring {args.chunks} chunks x {n_ctx - 1 - first} positions\n")
    print(f"{'config':>8} {'K':>5} {'exact':>9} {'both top-K':>11} {'ratio':>7} {'full ref':>9} {'ratio':>7}")
    for name in args.configs.split(","):
        k_type, _, v_type = name.partition("/")
        kv = KVConfig(T(k_type), T(v_type or k_type))
        scorer = EmbeddedScorer(
            llm._model,
            primary=kv,
            reference=KVConfig(T.F16, T.F16),
            n_ctx=n_ctx,
            threads=2,
            flash_attn=True,
            chunk=16,
        )
        exact: list[float] = []
        both: dict[int, list[float]] = {k: [] for k in ks}
        full: dict[int, list[float]] = {k: [] for k in ks}
        kmax = max(ks)
        for c in range(args.chunks):
            seq = tokens[c * n_ctx : (c + 1) * n_ctx]
            seq[0] = llm.token_bos()
            rows: dict[str, np.ndarray] = {}
            for side, ctx in (("ref", scorer._ctx_reference), ("pri", scorer._ctx_primary)):
                ctx.kv_cache_clear()
                parts = []
                scorer._decode(ctx, seq[:first], 0, with_logits=False)
                for i in range(first, n_ctx - 1, 16):
                    part = seq[i : min(i + 16, n_ctx - 1)]
                    scorer._decode(ctx, part, i, with_logits=True)
                    parts.append(scorer._logits(ctx, len(part)).copy())
                rows[side] = np.concatenate(parts)
            targets = seq[first + 1 :]
            exact.extend(exact_kld(rows["ref"], rows["pri"], targets).kld.tolist())
            for r, q in zip(rows["ref"], rows["pri"], strict=True):
                lr, lq = log_softmax(r), log_softmax(q)
                top_r = np.argpartition(-lr, kmax)[:kmax]
                top_r = top_r[np.argsort(-lr[top_r])]
                top_q = np.argpartition(-lq, kmax)[:kmax]
                top_q = top_q[np.argsort(-lq[top_q])]
                for k in ks:
                    both[k].append(coarse_kld_row(top_r[:k], lr[top_r[:k]], top_q[:k], lq[top_q[:k]]))
                    full[k].append(coarse_kld_row(top_q[:k], lr[top_q[:k]], top_q[:k], lq[top_q[:k]]))
        scorer.close()
        e = float(np.mean(exact))
        for k in ks:
            b, f = float(np.mean(both[k])), float(np.mean(full[k]))
            print(f"{name:>8} {k:>5} {e:>9.4f} {b:>11.4f} {b / e:>7.1%} {f:>9.4f} {f / e:>7.1%}")
    llm.close()


if __name__ == "__main__":
    main()
