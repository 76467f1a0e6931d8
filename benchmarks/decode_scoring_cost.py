"""What exact scoring costs per scored token, on the decode path and the prefill path, against generation.

Loads one GGUF (the bundled Gemma 3 270M by default) once, as the embedded backend does (same
context settings, ``--n-gpu-layers`` layers offloaded). It generates ``--tokens`` tokens greedily for
each of ``--jobs`` English prompts (timed), then generates them again untimed to keep the served
logprob of every emitted token. Then it scores exactly those jobs against an f16 reference with:

* the prefill path (chunked replay, ``--chunk`` positions per call);
* the decode path, one job at a time (B = 1): what generation computed, replayed;
* the decode path with B jobs in lockstep as B sequences of one context (``--sequences``).

For each it prints the milliseconds per scored token (the best of ``--repeats`` rounds) and the
ratio to generation (both including the prompt's prefill: a job's whole cost over its tokens), the
mean KLD over all tokens, the largest per-position KLD difference against B = 1 (0 means bit for
bit), and the largest difference between the primary's replayed logprob of each emitted token and
the one generation served.

    python benchmarks/decode_scoring_cost.py [--n-gpu-layers 99] [--threads 2] [--model F.gguf]
        [--cache-type-k q4_0] [--cache-type-v q4_0] [--tokens 64] [--jobs 8] [--sequences 1,2,4,8]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import kvproxy  # noqa: F401  (first: llama.cpp before numpy, see kvproxy/__init__.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores
from kvproxy.model.memory import ggml_type
from kvproxy.scoring.embedded import EmbeddedScorer, ScoreRequest


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Generated:
    prompt: list[int]
    tokens: list[int]
    served: list[float]  # logprob of each emitted token, as generation served it
    seconds: float  # prompt prefill + every decode
    decode_seconds: float  # the decodes after the first token


def generate(
    llm: Any, prompt: list[int], n: int, *, keep_logprobs: bool
) -> tuple[list[int], list[float], float, float]:
    """Greedy generation as the embedded backend runs it; the served logprobs only when asked."""
    import llama_cpp

    from kvproxy.kld import log_softmax as log_softmax_row

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    tokens: list[int] = []
    served: list[float] = []
    llm.reset()
    start = time.perf_counter()
    first = start
    stream = llm.generate(prompt, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0, reset=True)
    try:
        for token in stream:
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
            if keep_logprobs:
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                served.append(float(log_softmax_row(row)[token]))
            if len(tokens) >= n or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
    finally:
        stream.close()
    end = time.perf_counter()
    return tokens, served, end - start, end - first


def main() -> None:
    import llama_cpp

    from kvproxy.backends.devices import gpu_offload_supported
    from kvproxy.backends.embedded import bundled_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the bundled Gemma 3 270M)")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-type-k", type=KVCacheType, default=KVCacheType.Q4_0)
    ap.add_argument("--cache-type-v", type=KVCacheType, default=KVCacheType.Q4_0)
    ap.add_argument("--reference-type", type=KVCacheType, default=KVCacheType.F16)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated (and scored) per job")
    ap.add_argument("--jobs", type=int, default=8, help="prompts, each one job")
    ap.add_argument("--prompt-words", type=int, default=120, help="job i: (1 + i %% 4) times this")
    ap.add_argument("--batch-size", type=int, default=512, help="the serving context's n_batch")
    ap.add_argument("--chunk", type=int, default=64, help="prefill path: positions per call")
    ap.add_argument("--sequences", default="1,2,4,8", help="decode path: jobs in lockstep, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over every variant; the best time counts")
    args = ap.parse_args()
    sequences = sorted({int(x) for x in args.sequences.split(",")} | {1})

    model = str(args.model or bundled_model_path())
    primary = KVConfig(args.cache_type_k, args.cache_type_v)
    reference = KVConfig(args.reference_type, args.reference_type)
    words = english_text().split()
    progress(
        f"loading {model} with {args.n_gpu_layers} GPU layers (offload supported: {gpu_offload_supported()})"
    )
    probe = llama_cpp.Llama(model, n_ctx=16, vocab_only=True, verbose=False)
    # prompts of 1 to 4 times --prompt-words, from different places of the text (read round): past 256
    # and 512 cells llama.cpp's CPU flash attention changes kernels for an f16 cache
    words = words * (2 + 4 * args.prompt_words // len(words))
    prompts = [
        probe.tokenize(
            " ".join(words[i * 173 : i * 173 + args.prompt_words * (1 + i % 4)]).encode(), add_bos=True
        )
        for i in range(args.jobs)
    ]
    probe.close()
    n_ctx = -(-(max(len(p) for p in prompts) + args.tokens + 8) // 256) * 256
    llm = llama_cpp.Llama(
        model,
        n_gpu_layers=args.n_gpu_layers,
        n_ctx=n_ctx,
        n_batch=min(args.batch_size, n_ctx),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        type_k=int(ggml_type(primary.cache_type_k)),
        type_v=int(ggml_type(primary.cache_type_v)),
        flash_attn=True,
        swa_full=False,
        logits_all=False,
        verbose=False,
    )

    progress(f"generating {args.jobs} jobs of {args.tokens} tokens (warm-up, timed, then with logprobs)")
    generate(llm, prompts[0], 8, keep_logprobs=False)
    jobs: list[Generated] = []
    for i, prompt in enumerate(prompts):
        tokens, _, seconds, decode_seconds = generate(llm, prompt, args.tokens, keep_logprobs=False)
        again, served, _, _ = generate(llm, prompt, args.tokens, keep_logprobs=True)
        if again != tokens:
            progress(f"  job {i}: greedy generation is not repeatable here; served logprobs skipped")
            served = []
        jobs.append(Generated(prompt, tokens, served, seconds, decode_seconds))
        progress(f"  job {i}: prompt {len(prompt)} tokens, generated {len(tokens)}, {seconds:.2f} s")
    n_tokens = sum(len(j.tokens) for j in jobs)
    gen_ms = 1e3 * sum(j.seconds for j in jobs) / n_tokens
    decode_ms = 1e3 * sum(j.decode_seconds for j in jobs) / sum(len(j.tokens) - 1 for j in jobs)
    requests = [ScoreRequest(j.prompt, j.tokens, [[t] for t in j.tokens]) for j in jobs]

    variants: list[tuple[str, dict[str, Any]]] = [("prefill", {"path": "prefill", "chunk": args.chunk})]
    variants += [(f"decode B={b}", {"path": "decode", "max_sequences": b}) for b in sequences]
    results: dict[str, tuple[float, list[PositionScores]]] = {}
    for repeat in range(args.repeats):  # round robin: a burst of other load hits one round, not one variant
        for name, kwargs in variants:
            progress(f"round {repeat + 1}/{args.repeats}: scoring on the {name} path")
            scorer = EmbeddedScorer(
                llm._model,
                primary=primary,
                reference=reference,
                n_ctx=n_ctx,
                threads=args.threads,
                flash_attn=True,
                batch=min(args.batch_size, n_ctx),
                **kwargs,
            )
            scorer.score(jobs[0].prompt, jobs[0].tokens[:4])  # warm-up
            start = time.perf_counter()
            out = scorer.score_batch(requests)
            seconds = time.perf_counter() - start
            scorer.close()
            scores = [s for s in out if isinstance(s, PositionScores)]
            if len(scores) != len(out):
                raise SystemExit(
                    f"{name}: a job failed: {[s for s in out if not isinstance(s, PositionScores)]}"
                )
            if name not in results or seconds < results[name][0]:  # the best round; figures are the same
                results[name] = (seconds, scores)
            progress(f"  {1e3 * seconds / n_tokens:.2f} ms per scored token")

    device = "GPU" if args.n_gpu_layers > 0 and gpu_offload_supported() else "CPU"
    print(
        f"\n{Path(model).name}, {device} ({args.n_gpu_layers} GPU layers, {args.threads} threads), primary "
        f"{primary} against {reference}; {args.jobs} jobs, prompts {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens, {n_tokens} scored tokens\n"
        f"generation: {gen_ms:.3f} ms per token with the prompt's prefill, {decode_ms:.3f} ms per decode\n"
    )
    print(
        "| scoring | ms per scored token | x generation | mean KLD | max abs ΔKLD vs B=1 "
        "| max abs Δ served logprob |"
    )
    print("|---|---|---|---|---|---|")
    base = results["decode B=1"][1]
    for name, (seconds, scores) in results.items():
        ms = 1e3 * seconds / n_tokens
        mean = float(np.concatenate([s.kld for s in scores]).mean())
        diff = max(float(np.abs(a.kld - b.kld).max()) for a, b in zip(base, scores, strict=True))
        served = [
            abs(got[0] - want)
            for job, s in zip(jobs, scores, strict=True)
            for got, want in zip(s.check_logprobs or [], job.served, strict=False)
        ]
        served_cell = f"{max(served):.3g}" if served else "n/a"
        print(f"| {name} | {ms:.3f} | {ms / gen_ms:.2f}x | {mean:.6f} | {diff:.3g} | {served_cell} |")
    llm.close()


if __name__ == "__main__":
    main()
