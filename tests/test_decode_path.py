"""The decode path replays what generation served, bit for bit; batched decoding and the shadow pool.

Why replay at all: the served rows are what a user got, but keeping them costs 1 MiB a position at
Gemma's 262,144-word vocabulary. If a replay reproduces them exactly, the scorer can recompute them
in bounded memory instead. These tests generate with the real embedded backend and compare.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvproxy.backends.base import (
    Finished,
    GenerationRequest,
    KVConfig,
    SamplingParams,
    TokenLogprob,
)
from kvproxy.backends.devices import gpu_offload_supported
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import KVCacheType as T
from kvproxy.config import Settings
from kvproxy.corpus import english_text
from kvproxy.kld import PositionScores
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import ggml_type
from kvproxy.scoring.embedded import EmbeddedScorer, ScoreRequest, decode_step_bytes, make_scorer
from kvproxy.scoring.scorers import ThreadedScorer
from kvproxy.serving.openai_format import collect
from kvproxy.shadow.pool import ShadowJob, ShadowPool
from kvproxy.shadow.quality import QualityTracker
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

F16 = KVConfig(T.F16, T.F16)
Q4 = KVConfig(T.Q4_0, T.Q4_0)


def _words(start: int, n: int) -> str:
    return " ".join(english_text().split()[start : start + n])


async def _generate(
    backend: EmbeddedBackend, prompt: list[int], n: int
) -> tuple[list[TokenLogprob], Finished]:
    request = GenerationRequest(
        prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0), top_logprobs=5
    )
    got = await collect(backend.generate(request))
    return got.logprobs, got.done


@pytest.mark.parametrize(
    ("kv", "words", "batch"),
    [
        # batch 64 < the prompt: generation prefills it in three llama_decode calls, and so must the replay
        (T.Q4_0, 110, 64),
        # an f16 primary past 512 cells: llama.cpp's CPU attention splits the KV over the threads
        (T.F16, 500, 512),
    ],
)
def test_decode_replay_reproduces_the_served_logprobs(
    gemma_path: Path, kv: T, words: int, batch: int
) -> None:
    settings = Settings(
        model=gemma_path,
        ctx_size=1024,
        batch_size=batch,
        threads=THREADS_N,
        shadow_rate=0,
        cache_type_k=kv,
        cache_type_v=kv,
    )
    backend = EmbeddedBackend(settings, read_model_info(gemma_path))
    assert backend.kv == KVConfig(kv, kv) and backend.n_gpu_layers == 0

    async def run() -> tuple[list[int], list[TokenLogprob], Finished]:
        await backend.load()
        prompt = backend.tokenize(_words(0, words), add_bos=True)
        served, finished = await _generate(backend, prompt, 48)
        return prompt, served, finished

    prompt, served, finished = asyncio.run(run())
    assert len(prompt) > 2 * batch or len(prompt) > 512
    assert len(served) == finished.completion_tokens >= 40
    tokens = list(finished.token_ids)
    # per position: the emitted token first, then the served top 5
    check = [[s.token_id, *(t.token_id for t in s.top)] for s in served]
    want = np.array([[s.logprob, *(t.logprob for t in s.top)] for s in served])
    got = {}
    for path in ("decode", "prefill"):
        scorer = make_scorer(backend, F16, path=path)
        assert scorer.path == path
        scores = scorer.score(prompt, tokens, check)
        scorer.close()
        assert scores.check_logprobs is not None and len(scores) == len(tokens)
        got[path] = np.array(scores.check_logprobs)
    backend.close()
    decode_diff = float(np.abs(got["decode"] - want).max())
    prefill_diff = float(np.abs(got["prefill"] - want).max())
    bitwise = np.array_equal(got["decode"], want)
    print(
        f"\n{len(served)} served positions after a {len(prompt)}-token prompt, {kv.value} K/V, greedy: "
        f"decode replay max |Δ logprob| {decode_diff:.3g} (bitwise equal: {bitwise}),"
        f" prefill replay {prefill_diff:.3g}"
    )
    assert bitwise  # bit for bit: the same rows, the same arithmetic
    assert prefill_diff > 1e-4  # the chunked replay computes other numerics


def _jobs(llm: Any, n: int) -> list[ScoreRequest]:
    """Greedy completions of English prompts of different lengths, generated on the decode path."""
    out = []
    for i in range(n):
        prompt = llm.tokenize(_words(300 * i, 40 + 15 * i).encode(), add_bos=True)
        llm.reset()
        completion = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            completion.append(int(tok))
            if len(completion) == 24 + 5 * i:
                break
        out.append(ScoreRequest(prompt, completion))
    return out


@pytest.fixture(scope="module")
def llm_and_jobs(gemma_path: Path) -> tuple[Any, list[ScoreRequest]]:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(gemma_path),
        n_ctx=256,
        n_threads=THREADS_N,
        type_k=int(ggml_type(T.Q4_0)),
        type_v=int(ggml_type(T.Q4_0)),
        flash_attn=True,
        swa_full=False,
        verbose=False,
    )
    # three jobs: an odd number, so the lockstep pairs end with one job alone, as five did
    return llm, _jobs(llm, 3)


@pytest.fixture(scope="module")
def alone(llm_and_jobs: tuple[Any, list[ScoreRequest]]) -> list[PositionScores]:
    """Each job scored on its own (one sequence): the figures both batched tests must reproduce."""
    llm, jobs = llm_and_jobs
    single = _scorer(llm, 1)
    try:
        return [single.score(j.prompt, j.completion) for j in jobs]
    finally:
        single.close()


def _scorer(llm: Any, sequences: int) -> EmbeddedScorer:
    return EmbeddedScorer(
        llm._model,
        primary=Q4,
        reference=F16,
        n_ctx=256,
        threads=THREADS_N,
        flash_attn=True,
        path="decode",
        max_sequences=sequences,
    )


def test_two_sequences_in_lockstep_give_the_single_sequence_figures(
    llm_and_jobs: tuple[Any, list[ScoreRequest]], alone: list[PositionScores]
) -> None:
    """Within 256 cells. Past 512, llama.cpp's CPU attention reads an f16 cache with a KV-split
    kernel for one sequence only, and the figures move by up to 0.1 a position (the benchmark)."""
    llm, jobs = llm_and_jobs
    paired = _scorer(llm, 2)
    too_long = ScoreRequest([1] * 300, [2, 3])
    batch = paired.score_batch([jobs[0], jobs[1], too_long, *jobs[2:], ScoreRequest([5], [])])
    paired.close()
    assert isinstance(batch[2], ValueError) and "do not fit" in str(batch[2])
    empty = batch[-1]
    assert isinstance(empty, PositionScores) and len(empty) == 0
    scored = [s for s in batch[:2] + batch[3:-1] if isinstance(s, PositionScores)]
    assert len(scored) == len(jobs)
    worst = max(float(np.abs(a.kld - b.kld).max()) for a, b in zip(alone, scored, strict=True))
    mean_alone = float(np.concatenate([a.kld for a in alone]).mean())
    mean_paired = float(np.concatenate([b.kld for b in scored]).mean())
    print(f"\nB=1 mean KLD {mean_alone:.6f}, B=2 {mean_paired:.6f}, max |Δ KLD| per position {worst:.3g}")
    for a, b in zip(alone, scored, strict=True):
        assert a.first_position == b.first_position and len(a) == len(b)
        assert np.array_equal(a.same_top, b.same_top)
    assert worst < 1e-6
    assert mean_paired == pytest.approx(mean_alone, rel=1e-6)


def test_decode_memory_bound_does_not_grow_with_the_sequence() -> None:
    v = 262_144
    assert decode_step_bytes(1, v) == 4 * 2**20 + 8 * 2**20 + 2 * 2**20
    assert decode_step_bytes(8, v) == 32 * 2**20 + 8 * 2**20 + 2 * 2**20


def test_gpu_offload_is_reported() -> None:
    assert isinstance(gpu_offload_supported(), bool)


class CountingScorer(ThreadedScorer):
    """The real threaded scorer, recording how many jobs each call took."""

    def __init__(self, llm: Any, sequences: int) -> None:
        super().__init__(lambda: _scorer(llm, sequences))
        self.calls: list[int] = []

    async def score(self, job: ShadowJob) -> PositionScores:
        self.calls.append(1)
        return await super().score(job)

    async def score_many(self, jobs: Sequence[ShadowJob]) -> list[PositionScores | ValueError]:
        self.calls.append(len(jobs))
        return await super().score_many(jobs)


def test_shadow_pool_hands_queued_jobs_to_the_batched_scorer(
    llm_and_jobs: tuple[Any, list[ScoreRequest]], alone: list[PositionScores]
) -> None:
    llm, jobs = llm_and_jobs
    shadow_jobs = [ShadowJob(tuple(j.prompt), tuple(j.completion)) for j in jobs]
    shadow_jobs.insert(1, ShadowJob((), (1, 2)))  # no prompt: this job fails, the others are scored

    async def run() -> tuple[ShadowPool, list[int]]:
        scorer = CountingScorer(llm, 2)
        await scorer.start()
        assert scorer.max_jobs == 2
        pool = ShadowPool(scorer, QualityTracker(), queue_size=16)
        for job in shadow_jobs:  # queued before the worker starts: it finds them all waiting
            ticket = pool.ticket()
            assert ticket is not None
            ticket.submit(job)
        c = pool.counters
        assert c.sampled == len(shadow_jobs) == pool.queued
        pool.start()
        await asyncio.sleep(0)
        assert c.sampled == c.scored + c.failed + c.dropped + pool.queued + pool.in_flight
        await pool.drain(timeout=300)
        await pool.stop()
        scorer.close()
        return pool, scorer.calls

    pool, calls = asyncio.run(run())
    c = pool.counters
    assert calls == [2, 2] and sum(calls) == len(shadow_jobs)
    assert (c.scored, c.failed, c.dropped) == (len(jobs), 1, 0)
    assert c.sampled == c.scored + c.failed + c.dropped + pool.queued + pool.in_flight
    assert c.scored_tokens == sum(len(j.completion) for j in jobs) == pool.tracker.tokens
    mean = float(np.concatenate([a.kld for a in alone]).mean())
    assert pool.tracker.since_start().mean == pytest.approx(mean, rel=1e-6)
