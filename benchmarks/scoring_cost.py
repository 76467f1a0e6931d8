"""Issue 27 part 2: decode-path scoring per scored token, the old path and the new, beside generation.

For each model, in one run: the default Gemma 3 270M (the bundled GGUF, or ``$GEMMA_GGUF``) and a
random-weights model in Qwen3 1.7B's shapes (28 layers, n_embd 2048, 16 query / 8 KV heads of 128,
n_ff 6144, vocabulary 151,936, tied embeddings, f16 weights: 2.0 B parameters with the embeddings;
written at run time into /tmp with the ``gguf`` package; its outputs are noise, its cost is real):

1. generation: ``--jobs`` greedy requests of ``--tokens`` tokens through kvproxy's own slot scheduler
   (kvproxy.backends.slots, one slot) with the primary KV config, timed without and then with the
   served rows captured (kvproxy.backends.row_capture, with its reserve of pre-faulted blocks as
   the embedded backend keeps it; ``--reserve-blocks 0``: every block fresh, as before the
   reserve): the capture's cost on the client's path, and how many blocks the generation thread
   took unfaulted;
2. old path: ``EmbeddedScorer`` on the decode path replaying both the primary config and the f16
   reference, the KLD between steps (what scoring cost before);
3. new path: ``EmbeddedScorer.score_captured_many``: the reference alone against the captured rows,
   the KLD overlapping the next block's decode, the jobs as one pipeline (a job's last KLD
   overlapping the next job), as the shadow worker hands queued jobs over
   (kvproxy.scoring.captured); and ``score_captured`` one job a call;
4. f16-decode floor: the same reference decodes (the same cache clear and prompt prefill, then one
   token a call, a logits row read each) and nothing else: what exact scoring cannot go below.

Each figure is milliseconds per scored token including the prompt's prefill (a job's whole cost over
its tokens), the best of ``--repeats`` rounds. Printed: the ratios to generation and to the floor,
the mean KLD (exact, full vocabulary, decode path) of the old and new paths with their relative
difference (the issue's 0.5 % check), and, unless ``--no-breakdown``, where the time goes: one more
pass of the new path, of one job a call and of the floor with the clock read between the calls
(prompt prefill, llama_decode calls, the wait for each row, the row copy, the KLD waits), in ms per
scored token, and the new path minus the floor. ``--capture-only`` stops after generation.

    python3 benchmarks/scoring_cost.py --ngl 99                 # the GPU run (under 4 minutes)
    python3 benchmarks/scoring_cost.py --ngl 99 --capture-only  # the client's side alone
    python3 benchmarks/scoring_cost.py --tokens 20 --jobs 2 --prompt-words 30 --repeats 1 \
        --big-layers 2 --big-jobs 1 --big-tokens 6              # a CPU dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# llama.cpp's libraries load before numpy's (sorted first): numpy first crashed the H100 host's model
# load (issue 25's finding 8; kvproxy.backends.native)
import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    KVConfig,
    SamplingParams,
)
from kvproxy.backends.row_capture import BLOCK_ROWS, RESERVE_BLOCKS, CaptureBudget, RowCapture
from kvproxy.backends.sequence import SequenceOutput
from kvproxy.backends.slots import Entry, SlotConfig, SlotScheduler
from kvproxy.config import KVCacheType
from kvproxy.corpus import english_text
from kvproxy.model.memory import ggml_type, llama_n_ubatch
from kvproxy.scoring.captured import Phases
from kvproxy.scoring.embedded import EmbeddedScorer, ScoreRequest

# Qwen3 1.7B (config.json of Qwen/Qwen3-1.7B)
QWEN3_1_7B = {"n_embd": 2048, "n_layer": 28, "n_head": 16, "n_head_kv": 8, "head_dim": 128, "n_ff": 6144}
QWEN3_VOCAB = 151_936


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_qwen3_shaped(path: Path, *, n_layer: int, vocab: int) -> Path:
    """A Qwen3-1.7B-shaped GGUF (``n_layer`` layers) with random f16 weights and a made-up SPM
    vocabulary of ``vocab`` tokens (the ids are fed directly; the text never matters)."""
    from gguf import GGUFWriter, TokenType

    s = QWEN3_1_7B
    e, hd, nh, nkv, ff = s["n_embd"], s["head_dim"], s["n_head"], s["n_head_kv"], s["n_ff"]
    w = GGUFWriter(str(path), "qwen3")
    w.add_name("random qwen3-1.7b shapes")
    w.add_context_length(40960)
    w.add_embedding_length(e)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(1)  # mostly f16
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁t{i}" for i in range(vocab - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np.float16)  # tiled: fast

    def tensor(name: str, *shape: int) -> None:
        n = int(np.prod(shape))
        start = int(rng.integers(0, pool.size // 2))
        w.add_tensor(name, np.resize(pool[start:], n).reshape(shape))

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    tensor("token_embd.weight", vocab, e)  # tied: also the output matrix
    norm("output_norm.weight", e)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight", e)
        tensor(f"blk.{i}.attn_q.weight", nh * hd, e)
        tensor(f"blk.{i}.attn_k.weight", nkv * hd, e)
        tensor(f"blk.{i}.attn_v.weight", nkv * hd, e)
        tensor(f"blk.{i}.attn_output.weight", e, nh * hd)
        norm(f"blk.{i}.attn_q_norm.weight", hd)
        norm(f"blk.{i}.attn_k_norm.weight", hd)
        norm(f"blk.{i}.ffn_norm.weight", e)
        tensor(f"blk.{i}.ffn_gate.weight", ff, e)
        tensor(f"blk.{i}.ffn_up.weight", ff, e)
        tensor(f"blk.{i}.ffn_down.weight", e, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class _Vocab:
    """What SequenceOutput asks of a vocabulary (no text is wanted here)."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab

    def is_end_of_generation(self, token: int) -> bool:

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        return b""

    def special_piece(self, token: int) -> bytes:
        return b""


@dataclass
class Job:
    prompt: list[int]
    tokens: list[int]
    capture: RowCapture | None


def generate(
    slots: SlotScheduler, vocab: _Vocab, prompt: list[int], n: int, capture: RowCapture | None
) -> tuple[list[int], float]:
    """One greedy request through the slot scheduler; its token ids and wall seconds."""
    done = threading.Event()
    result: list[Finished] = []
    failed: list[BaseException] = []

    def emit(event: GenerationEvent | BaseException) -> None:
        if isinstance(event, BaseException):
            failed.append(event)
            done.set()
        elif isinstance(event, Finished):
            result.append(event)
            done.set()

    request = GenerationRequest(
        prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0), capture=capture
    )
    start = time.perf_counter()
    slots.submit(Entry(request, SequenceOutput(request, vocab, emit), threading.Event()))
    done.wait()
    seconds = time.perf_counter() - start
    if failed:
        raise failed[0]
    return list(result[0].token_ids), seconds


def floor_pass(scorer: EmbeddedScorer, request: ScoreRequest, phases: Phases | None = None) -> None:
    """The reference's decodes of the new path and nothing else (no copy, no KLD): the same cache
    clear and prompt prefill (calls of the serving batch, the last row read), the same one-token
    calls and one row read after each. ``phases``: the same split as the new path's."""
    ctx = scorer._ctx_reference
    if phases is None:  # the timed pass: no clock reads
        ctx.kv_cache_clear()
        scorer._prefill_prompt(ctx, request.prompt, 0)
        ctx.get_logits_ith(-1)
        for j in range(1, len(request.completion)):
            scorer._fill([request.completion[j - 1]], [len(request.prompt) + j - 1], [0], 1)
            ctx.decode(scorer._batch)
            ctx.get_logits_ith(-1)
        ctx.kv_cache_clear()
        return
    clock = time.perf_counter
    t = Phases(jobs=1, tokens=len(request.completion))
    started = clock()
    ctx.kv_cache_clear()
    scorer._prefill_prompt(ctx, request.prompt, 0)
    ctx.get_logits_ith(-1)  # waits for the row, as every path does before reading it
    t.prefill = clock() - started
    for j in range(1, len(request.completion)):
        t0 = clock()
        scorer._fill([request.completion[j - 1]], [len(request.prompt) + j - 1], [0], 1)
        ctx.decode(scorer._batch)
        t1 = clock()
        ctx.get_logits_ith(-1)
        t2 = clock()
        t.decode += t1 - t0
        t.sync += t2 - t1
    ctx.kv_cache_clear()
    t.other = clock() - started - t.prefill - t.decode - t.sync
    phases.add(t)


def measure(label: str, model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:

    primary = KVConfig(args.cache_type_k, args.cache_type_v)
    reference = KVConfig(KVCacheType.F16, KVCacheType.F16)
    n_ctx = -(-(max(len(p) for p in prompts) + args_tokens(args, label) + 8) // 256) * 256
    batch = min(512, n_ctx)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model,
        n_gpu_layers=args.ngl,
        n_ctx=256,
        n_batch=256,
        flash_attn=True,
        swa_full=False,
        logits_all=False,
        verbose=False,
    )
    llm._ctx.close()  # type: ignore[no-untyped-call]  # as the embedded backend: generation has a context of its own
    progress(f"{label}: loaded in {time.perf_counter() - t0:.1f} s")
    n_vocab = int(llm.n_vocab())
    config = SlotConfig(
        n_slots=1,
        n_ctx=n_ctx,
        n_batch=batch,
        n_ubatch=llama_n_ubatch(batch, n_ctx),
        prefill_chunk=128,
        threads=args.threads,
        flash_attn=True,
        type_k=int(ggml_type(primary.cache_type_k)),
        type_v=int(ggml_type(primary.cache_type_v)),
        max_queue=4,
    )
    slots = SlotScheduler(llm._model, config, n_vocab)
    slots.start()
    vocab = _Vocab(llama_cpp.llama_model_get_vocab(llm.model))
    n = args_tokens(args, label)
    generate(slots, vocab, prompts[0], 4, None)  # warm-up
    budget = CaptureBudget(1 << 40, args.reserve_blocks)  # no limit here: every job is captured
    budget.prepare(BLOCK_ROWS, n_vocab)  # as the embedded backend does at load: a reserve of blocks
    wait_for_reserve(budget)
    gen_plain: list[float] = []
    gen_capture: list[float] = []
    jobs: list[Job] = []
    for repeat in range(args.repeats):
        plain = captured = 0.0
        round_jobs = []
        for p in prompts:
            _tokens, s = generate(slots, vocab, p, n, None)
            plain += s
            cap = RowCapture(n_vocab, budget)
            tokens, s = generate(slots, vocab, p, n, cap)
            captured += s
            round_jobs.append(Job(p, tokens, cap))
        gen_plain.append(plain)
        gen_capture.append(captured)
        if repeat == 0:
            jobs = round_jobs
        else:
            for j in round_jobs:
                assert j.capture is not None
                j.capture.release()
    slots.close()
    capture_status = budget.status()
    blocks_taken = budget.taken_blocks
    n_scored = sum(len(j.tokens) for j in jobs)
    progress(f"{label}: generated {len(jobs)} jobs, {n_scored} tokens")
    result: dict[str, Any] = {
        "label": label,
        "n_vocab": n_vocab,
        "jobs": len(jobs),
        "tokens": n_scored,
        "prompts": (min(map(len, prompts)), max(map(len, prompts))),
        "fresh_blocks": capture_status["fresh_blocks"],
        "refilled_blocks": budget.refilled_blocks,
        "blocks_taken": blocks_taken,
    }
    generation_ms = {
        "generation": 1e3 * min(gen_plain) / n_scored,
        "generation + capture": 1e3 * min(gen_capture) / n_scored,
    }
    if args.capture_only:
        for j in jobs:
            if j.capture is not None:
                j.capture.release()
        budget.close()
        llm.close()
        return {**result, "ms": generation_ms}

    scorer = EmbeddedScorer(
        llm._model,
        primary=primary,
        reference=reference,
        n_ctx=n_ctx,
        threads=args.threads,
        flash_attn=True,
        batch=batch,
        path="decode",
        ubatch=llama_n_ubatch(batch, n_ctx),
    )
    requests = [ScoreRequest(j.prompt, j.tokens) for j in jobs]
    scorer.score(requests[0].prompt, requests[0].completion[:4])  # warm-up
    pairs = [(r, j.capture) for r, j in zip(requests, jobs, strict=True) if j.capture is not None]
    assert len(pairs) == len(requests)
    old_s: list[float] = []
    new_s: list[float] = []
    single_s: list[float] = []
    floor_s: list[float] = []
    old_scores: list[Any] = []
    new_scores: list[Any] = []
    single_scores: list[Any] = []
    for _ in range(args.repeats):  # round robin: a burst of other load hits one round, not one path
        t = time.perf_counter()
        old_scores = [scorer.score(r.prompt, r.completion) for r in requests]
        old_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        new_scores = scorer.score_captured_many(pairs)  # the jobs as one pipeline
        new_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        single_scores = [scorer.score_captured(r, c) for r, c in pairs]  # one call a job
        single_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for r in requests:
            floor_pass(scorer, r)
        floor_s.append(time.perf_counter() - t)
    phases: dict[str, Phases] = {}
    if args.breakdown:  # one more pass of each, with clock reads between the calls
        phases["new path"] = Phases()
        scorer.score_captured_many(pairs, phases=phases["new path"])
        phases["one job a call"] = Phases()
        for pair in pairs:
            scorer.score_captured_many([pair], phases=phases["one job a call"])
        phases["f16 floor"] = Phases()
        for r in requests:
            floor_pass(scorer, r, phases["f16 floor"])
    scorer.close()
    for j in jobs:
        if j.capture is not None:
            j.capture.release()
    budget.close()
    llm.close()
    ms = {
        **generation_ms,
        "old path (replay both)": 1e3 * min(old_s) / n_scored,
        "new path (reference + captured rows)": 1e3 * min(new_s) / n_scored,
        "new path, one job a call": 1e3 * min(single_s) / n_scored,
        "f16-decode floor": 1e3 * min(floor_s) / n_scored,
    }
    for scores in new_scores:
        if isinstance(scores, ValueError):
            raise scores
    old_kld = float(np.concatenate([x.kld for x in old_scores]).mean())
    new_kld = float(np.concatenate([x.kld for x in new_scores]).mean())
    single_kld = np.concatenate([x.kld for x in single_scores])
    if not np.array_equal(single_kld, np.concatenate([x.kld for x in new_scores])):
        raise AssertionError("the pipelined jobs' KLD differs from one job a call's")
    return {**result, "ms": ms, "old_kld": old_kld, "new_kld": new_kld, "phases": phases}


def wait_for_reserve(budget: CaptureBudget, timeout: float = 30.0) -> None:
    """Until the refill thread has made the reserve (the backend's is made while the server starts)."""
    deadline = time.perf_counter() + timeout
    while budget.refilled_blocks < budget.reserve_blocks and time.perf_counter() < deadline:
        time.sleep(0.01)


def args_tokens(args: argparse.Namespace, label: str) -> int:
    return int(args.big_tokens if label.startswith("random") else args.tokens)


PHASE_LABELS = {
    "prefill": "prompt prefill (its calls and the wait for its row)",
    "decode": "llama_decode calls (one token each)",
    "sync": "row wait (llama_get_logits_ith: the device finishing)",
    "copy": "row copy (memmove into a block buffer)",
    "kld_wait": "KLD wait before reusing a block buffer",
    "tail": "last blocks' KLD after the last decode",
    "other": "other (Python between the calls)",
}


def report(r: dict[str, Any]) -> None:
    ms = r["ms"]
    gen = ms["generation"]
    floor = ms.get("f16-decode floor")
    print(
        f"\n### {r['label']} (vocabulary {r['n_vocab']:,}): {r['jobs']} jobs, prompts {r['prompts'][0]}-"
        f"{r['prompts'][1]} tokens, {r['tokens']} scored tokens\n"
    )
    print("| per scored token | ms | x generation | x f16-decode floor |")
    print("|---|---|---|---|")
    for name, v in ms.items():
        vs_floor = f"{v / floor:.2f}x" if floor else "-"
        print(f"| {name} | {v:.3f} | {v / gen:.2f}x | {vs_floor} |")
    print(
        f"\ncapture cost on generation {100 * (ms['generation + capture'] / gen - 1):+.1f} %; capture "
        f"blocks taken not pre-faulted on the generation thread: {r['fresh_blocks']} of "
        f"{r['blocks_taken']} (the refill thread made {r['refilled_blocks']})"
    )
    if "old_kld" not in r:
        return
    rel = abs(r["new_kld"] - r["old_kld"]) / r["old_kld"] if r["old_kld"] else 0.0
    ok = "ok" if rel <= 0.005 else "FAILED"
    print(
        f"mean KLD (exact, full vocabulary, decode path) old path {r['old_kld']:.6g}, new path "
        f"{r['new_kld']:.6g}: relative difference {rel:.2e} ({ok}: at most 0.5 %); pipelined and one "
        "job a call: equal"
    )
    phases: dict[str, Phases] = r["phases"]
    if not phases:
        return
    columns = list(phases)
    table = {name: p.ms_per_token() for name, p in phases.items()}
    print(
        "\nWhere the time goes (one more pass of each, clock read between the calls), ms per scored token:\n"
    )
    print("| phase | " + " | ".join(columns) + " | new path - floor |")
    print("|---" * (len(columns) + 2) + "|")
    for key, label in PHASE_LABELS.items():
        cells = " | ".join(f"{table[c][key]:.3f}" for c in columns)
        diff = table["new path"][key] - table["f16 floor"][key]
        print(f"| {label} | {cells} | {diff:+.3f} |")
    totals = {c: sum(table[c].values()) for c in columns}
    cells = " | ".join(f"{totals[c]:.3f}" for c in columns)
    print(f"| **total** | {cells} | {totals['new path'] - totals['f16 floor']:+.3f} |")


def main() -> None:
    from kvproxy.backends.devices import gpu_offload_supported

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ngl", "--n-gpu-layers", type=int, default=0, dest="ngl")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--cache-type-k", type=KVCacheType, default=KVCacheType.Q4_0)
    ap.add_argument("--cache-type-v", type=KVCacheType, default=KVCacheType.Q4_0)
    ap.add_argument(
        "--model", type=Path, default=None, help="default: $GEMMA_GGUF or the bundled Gemma 3 270M"
    )
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated (and scored) per job")
    ap.add_argument("--prompt-words", type=int, default=60, help="job i: (1 + i %% 4) times this")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the best counts")
    ap.add_argument("--big-layers", type=int, default=QWEN3_1_7B["n_layer"], help="0: no random model")
    ap.add_argument("--big-vocab", type=int, default=QWEN3_VOCAB)
    ap.add_argument("--big-jobs", type=int, default=4)
    ap.add_argument("--big-tokens", type=int, default=48)
    ap.add_argument(
        "--reserve-blocks",
        type=int,
        default=RESERVE_BLOCKS,
        help="pre-faulted capture blocks kept ready (0: every block fresh, as before the reserve)",
    )
    ap.add_argument(
        "--capture-only",
        action="store_true",
        help="generation with and without capture only (the client's side; no scoring passes)",
    )
    ap.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the per-phase passes (where the new path's time goes beside the floor's)",
    )
    args = ap.parse_args()
    started = time.perf_counter()

    from kvproxy.backends.embedded import bundled_model_path

    gemma = str(args.model or os.environ.get("GEMMA_GGUF") or bundled_model_path())
    device = "GPU" if args.ngl > 0 and gpu_offload_supported() else "CPU"
    progress(f"{device}, {args.ngl} GPU layers, {args.threads} threads; primary {args.cache_type_k.value}")
    probe = llama_cpp.Llama(gemma, n_ctx=16, vocab_only=True, verbose=False)
    words = english_text().split()
    words = words * (2 + 4 * args.prompt_words // len(words))
    prompts = [
        probe.tokenize(
            " ".join(words[i * 173 : i * 173 + args.prompt_words * (1 + i % 4)]).encode(), add_bos=True
        )
        for i in range(args.jobs)
    ]
    probe.close()
    results = [measure(f"Gemma 3 270M ({Path(gemma).name})", gemma, prompts, args)]
    if args.big_layers > 0:
        with tempfile.TemporaryDirectory(prefix="kvproxy-scoring-cost-", dir="/tmp") as tmp:
            t = time.perf_counter()
            path = write_qwen3_shaped(
                Path(tmp) / "qwen3-shapes.gguf", n_layer=args.big_layers, vocab=args.big_vocab
            )
            params = _params(args.big_layers, args.big_vocab)
            size = path.stat().st_size / 2**30
            progress(
                f"wrote {size:.2f} GiB ({params / 1e9:.2f} B parameters) in {time.perf_counter() - t:.1f} s"
            )
            rng = np.random.default_rng(1)
            big_prompts = [
                [1, *rng.integers(259, args.big_vocab, 60 * (1 + i % 4)).tolist()]
                for i in range(args.big_jobs)
            ]
            label = (
                f"random weights, Qwen3 1.7B shapes ({args.big_layers} layers, {params / 1e9:.2f} B params)"
            )
            results.append(measure(label, str(path), big_prompts, args))
    print(
        f"\n## Scoring cost per scored token: {device} ({args.ngl} GPU layers, {args.threads} threads), "
        f"primary {args.cache_type_k.value}/{args.cache_type_v.value} against f16, best of {args.repeats}"
    )
    for r in results:
        report(r)
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")


def _params(n_layer: int, vocab: int) -> int:
    s = QWEN3_1_7B
    e, hd, nh, nkv, ff = s["n_embd"], s["head_dim"], s["n_head"], s["n_head_kv"], s["n_ff"]
    per_layer = e * hd * (2 * nh + 2 * nkv) + 3 * e * ff + 2 * e + 2 * hd
    return vocab * e + n_layer * per_layer + e


if __name__ == "__main__":
    main()
