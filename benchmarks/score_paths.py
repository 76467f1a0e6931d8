"""Decode path against prefill path, by llama-perplexity and by kvproxy, on one machine (CPU or GPU).

    python3 benchmarks/score_paths.py --llama-bin DIR [--n-gpu-layers 99] [--chunks 4]

llama-perplexity ``--kl-divergence`` (c=512, ``-b 512``) on the same English text: ``-ub 512`` is
the batched prefill path, ``-ub 1`` the one-token decode path that generation uses. Per KV config
three figures: both runs on the prefill path, both on the decode path, and the f16 reference on the
prefill path with the config on the decode path (what mixing paths reads: f16 itself is then not 0).
Then kvproxy's own scorer on the very same token ids: the decode path (prompt in micro-batches of
1, as ``-ub 1``) and the prefill path (chunks of 128 positions) against llama-perplexity's figure on
the same path. Prints both tables; writes score_paths.json to $OUT when that is set. The figures
and the command that produced them: docs/kld.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kvproxy  # noqa: F401, I001  (first: llama.cpp before numpy, see kvproxy/__init__.py)

from kvproxy.backends.base import KVConfig
from kvproxy.calibrate import parse_config
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores, summarize
from tests.llama_tools import read_base_tokens

N_CTX = 512
UB = {"prefill": "512", "decode": "1"}


def perplexity(bin_dir: Path, *args: str) -> str:
    cmd = [str(bin_dir / "llama-perplexity"), "-c", str(N_CTX), "-b", "512", "-fa", "on", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def parse(out: str) -> dict[str, float]:
    mean = re.search(r"Mean\s+KLD:\s+(-?[0-9.]+)\s+±\s+([0-9.]+)", out)
    same = re.search(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)\s+%", out)
    if not (mean and same):
        raise RuntimeError(out[-2000:])
    return {
        "mean": float(mean.group(1)),
        "error": float(mean.group(2)),
        "same_top": float(same.group(1)) / 100,
    }


def kv_args(kv: KVConfig) -> list[str]:
    return ["-ctk", kv.cache_type_k.value, "-ctv", kv.cache_type_v.value]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("KVPROXY_LLAMA_BIN", ".")))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--configs", default="f16,q8_0,q4_0,q8_0/q4_0,q4_0/q8_0")
    parser.add_argument("--skip-kvproxy", action="store_true", help="llama-perplexity's table only")
    args = parser.parse_args()
    if args.model is None:
        from kvproxy.backends.embedded import bundled_model_path

        args.model = bundled_model_path()
    configs = [parse_config(c) for c in args.configs.split(",")]
    common = [
        "-m",
        str(args.model),
        "-t",
        str(args.threads),
        "-ngl",
        str(args.n_gpu_layers),
        "--chunks",
        str(args.chunks),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="score-paths-"))
    text = tmp / "text.txt"
    text.write_text(english_text())
    bases = {}
    for path, ub in UB.items():
        bases[path] = tmp / f"base-{path}.kld"
        t0 = time.monotonic()
        perplexity(
            args.llama_bin,
            *common,
            "-f",
            str(text),
            "-ub",
            ub,
            "-ctk",
            "f16",
            "-ctv",
            "f16",
            "--kl-divergence-base",
            str(bases[path]),
        )
        print(f"f16 base on the {path} path: {time.monotonic() - t0:.1f} s", flush=True)
    table: dict[str, dict[str, Any]] = {}
    for kv in configs:
        row = {}
        for name, base, ub in (
            ("both prefill", "prefill", UB["prefill"]),
            ("both decode", "decode", UB["decode"]),
            ("reference prefill, config decode", "prefill", UB["decode"]),
        ):
            out = perplexity(
                args.llama_bin,
                *common,
                "-ub",
                ub,
                *kv_args(kv),
                "--kl-divergence-base",
                str(bases[base]),
                "--kl-divergence",
            )
            row[name] = parse(out)
        table[str(kv)] = row
        cells = "  ".join(f"{k}: {v['mean']:.4f}" for k, v in row.items())
        print(f"{kv}: {cells}", flush=True)

    agreement: dict[str, dict[str, Any]] = {}
    if not args.skip_kvproxy:
        agreement = kvproxy_agreement(args, configs, bases, table)
    print(
        f"\nllama-perplexity --kl-divergence, c={N_CTX}, {args.chunks} chunks, -ngl {args.n_gpu_layers}: "
        "mean KLD (same top)"
    )
    print("| KV | both prefill (-ub 512) | both decode (-ub 1) | reference prefill, config decode |")
    print("|---|---|---|---|")
    for kv, row in table.items():
        cells = " | ".join(f"{v['mean']:.4f} ({100 * v['same_top']:.1f} %)" for v in row.values())
        print(f"| {kv} | {cells} |")
    if agreement:
        print("\nkvproxy's scorer on the same token ids, against llama-perplexity on the same path")
        print("| KV | path | llama-perplexity | kvproxy | difference |")
        print("|---|---|---|---|---|")
        for kv, row in agreement.items():
            for path, a in row.items():
                lp, mine = a["llama_perplexity"], a["kvproxy"]
                # llama-perplexity keeps its base as 16-bit logprobs: an f16 config reads about 0
                diff = "both 0" if abs(lp) < 1e-5 and abs(mine) < 1e-5 else f"{100 * (mine / lp - 1):+.2f} %"
                print(f"| {kv} | {path} | {a['llama_perplexity']:.5f} | {a['kvproxy']:.5f} | {diff} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "score_paths.json").write_text(
            json.dumps(
                {
                    "perplexity": table,
                    "kvproxy": agreement,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


def kvproxy_agreement(
    args: argparse.Namespace,
    configs: list[KVConfig],
    bases: dict[str, Path],
    table: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    import llama_cpp

    from kvproxy.scoring.embedded import EmbeddedScorer

    llm = llama_cpp.Llama(str(args.model), n_ctx=64, n_gpu_layers=args.n_gpu_layers, verbose=False)
    f16 = parse_config("f16")
    first = N_CTX // 2
    out: dict[str, dict[str, Any]] = {}
    for kv in configs:
        row = {}
        for path, column in (("decode", "both decode"), ("prefill", "both prefill")):
            n_ctx, n_chunk, tokens = read_base_tokens(bases[path])
            seqs = []
            for c in range(n_chunk):
                seq = [int(t) for t in tokens[c * n_ctx : (c + 1) * n_ctx]]
                seq[0] = llm.token_bos()  # llama-perplexity starts every chunk with BOS
                seqs.append(seq)
            scorer = EmbeddedScorer(
                llm._model,
                primary=kv,
                reference=f16,
                n_ctx=N_CTX,
                threads=args.threads,
                flash_attn=True,
                path=path,  # type: ignore[arg-type]
                chunk=128,
                prompt_ubatch=1 if path == "decode" else None,
            )
            t0 = time.monotonic()
            try:
                scores = PositionScores.concat([scorer.score(s[: first + 1], s[first + 1 :]) for s in seqs])
            finally:
                scorer.close()
            s = summarize(scores)
            row[path] = {
                "llama_perplexity": table[str(kv)][column]["mean"],
                "kvproxy": s.mean,
                "kvproxy_same_top": s.same_top,
                "tokens": s.tokens,
                "seconds": time.monotonic() - t0,
            }
        out[str(kv)] = row
        print(
            f"kvproxy {kv}: decode {row['decode']['kvproxy']:.5f}, prefill {row['prefill']['kvproxy']:.5f}",
            flush=True,
        )
    llm.close()
    return out


if __name__ == "__main__":
    main()
