"""`kvproxy calibrate`'s sweep: every config against its own reference pass, and against one shared.

The same chunks of the bundled Gemma 3 270M's text (the Gemma Terms of Use, cut as
llama-perplexity cuts it), the same scorers (one ``EmbeddedScorer`` per config, as the sweep makes
them), scored two ways in one run, on each path:

1. per config: ``scorer.score(...)`` for each config, every scorer feeding its own f16 reference
   context (what the sweep did before): 2N passes over a chunk for N configs;
2. shared: ``kvproxy.scoring.embedded.score_against_one_reference``: the reference fed once a chunk
   and read by every config: N + 1 passes.

Printed: seconds per chunk each way, the ratio, and whether every config's per-position KLD,
same-top flag and probabilities came out identical (they must: the same calls, the same numerics).

    python3 benchmarks/calibrate_shared_reference.py                          # 4 configs, 2 chunks
    python3 benchmarks/calibrate_shared_reference.py --configs q8_0,q4_0 --chunks 1 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.calibrate import PREFILL_CHUNK, parse_config, text_chunks
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores
from kvproxy.scoring.embedded import EmbeddedScorer, score_against_one_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="q8_0,q8_0/q4_0,q4_0/q8_0,q4_0")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--ctx-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", default="prefill,decode")
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(str(bundled_model_path()), n_ctx=64, n_batch=64, verbose=False)
    chunks = list(
        text_chunks(
            [english_text()],
            lambda t: list(llm.tokenize(t.encode(), add_bos=False, special=False)),
            args.ctx_size,
            llm.token_bos(),
        )
    )[: args.chunks]
    first = args.ctx_size // 2
    configs = [parse_config(c) for c in args.configs.split(",")]
    table = Table(
        title=f"Gemma 3 270M, {len(configs)} configs against f16, {len(chunks)} chunks of {args.ctx_size}, "
        f"{args.threads} thread(s)"
    )
    for col in ("path", "per config s/chunk", "shared s/chunk", "shared / per config", "identical"):
        table.add_column(col, justify="right")
    for path in args.paths.split(","):
        scorers = [
            EmbeddedScorer(
                llm._model,
                primary=c,
                reference=parse_config("f16"),
                n_ctx=args.ctx_size,
                threads=args.threads,
                flash_attn=True,
                path=path,
                chunk=PREFILL_CHUNK,
            )
            for c in configs
        ]
        try:
            own: list[list[PositionScores]] = []
            shared: list[list[PositionScores]] = []
            t0 = time.perf_counter()
            for chunk in chunks:
                own.append([s.score(chunk[: first + 1], chunk[first + 1 :]) for s in scorers])
            t1 = time.perf_counter()
            for chunk in chunks:
                shared.append(score_against_one_reference(scorers, chunk[: first + 1], chunk[first + 1 :]))
            t2 = time.perf_counter()
        finally:
            for s in scorers:
                s.close()
        same = all(
            np.array_equal(getattr(a, f), getattr(b, f))
            for row_a, row_b in zip(own, shared, strict=True)
            for a, b in zip(row_a, row_b, strict=True)
            for f in ("kld", "same_top", "p_ref", "p_primary")
        )
        per, one = (t1 - t0) / len(chunks), (t2 - t1) / len(chunks)
        table.add_row(path, f"{per:.2f}", f"{one:.2f}", f"{one / per:.3f}", "yes" if same else "NO")
    llm.close()
    Console().print(table)


if __name__ == "__main__":
    main()
