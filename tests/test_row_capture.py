"""Captured served rows: the same numerics as the decode path's replay, bounded memory, counted fallback.

Why: scoring against the rows the primary served (kept at generation time) instead of replaying the
primary config halves the scorer's decodes; that is only worth having if, with one slot, the KLD is
the replay's (the rows are bit for bit the same), the memory stays within its budget, and a job whose
rows did not fit is still scored, by the replay, and counted.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import mmap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvproxy.backends.base import GenerationRequest, KVConfig, SamplingParams
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.backends.row_capture import (
    BLOCK_ROWS,
    PAGE_BYTES,
    RESERVE_BLOCKS,
    CaptureBudget,
    RowCapture,
    prefaulted_block,
    touch_pages,
)
from kvproxy.config import KVCacheType as T
from kvproxy.config import Settings
from kvproxy.corpus import english_text
from kvproxy.kld import exact_kld
from kvproxy.model.gguf_info import read_model_info
from kvproxy.scoring.captured import (
    PIPELINE_JOBS,
    BlockBuffers,
    CapturedJob,
    Phases,
    score_against_capture,
    score_captured_jobs,
)
from kvproxy.scoring.embedded import ScoreRequest, make_scorer
from kvproxy.scoring.job import ShadowJob
from kvproxy.scoring.scorers import ThreadedScorer
from kvproxy.serving.openai_format import collect
from kvproxy.shadow.capacity import ScoringCapacity, sustainable_rate
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

F16 = KVConfig(T.F16, T.F16)


def _ptr(row: np.ndarray[Any, Any]) -> Any:
    return ctypes.cast(row.ctypes.data, ctypes.POINTER(ctypes.c_float))


def _captured(rows: np.ndarray[Any, Any], budget: CaptureBudget) -> RowCapture:
    cap = RowCapture(rows.shape[1], budget)
    for r in rows:
        cap.take(_ptr(r))
    return cap


def test_capture_copies_rows_in_blocks_and_gives_the_budget_back() -> None:
    rng = np.random.default_rng(0)
    v = 1000
    rows = rng.standard_normal((2 * BLOCK_ROWS + 3, v)).astype(np.float32)
    block_bytes = BLOCK_ROWS * v * 4
    budget = CaptureBudget(3 * block_bytes)
    cap = _captured(rows, budget)
    assert cap.n_rows == len(rows) and cap.usable(len(rows)) and not cap.usable(len(rows) - 1)
    assert np.array_equal(cap.rows(), rows)  # bit for bit
    assert np.array_equal(cap.block(2), rows[2 * BLOCK_ROWS :])
    assert budget.held_bytes == 3 * block_bytes
    first_block = cap.block(0).ctypes.data
    cap.release()
    assert budget.held_bytes == 0 and budget.idle_bytes == 3 * block_bytes  # kept for reuse
    again = _captured(rows[:1], budget)  # the next request copies into memory already mapped
    assert again.block(0).ctypes.data == first_block
    assert budget.idle_bytes == 2 * block_bytes and budget.held_bytes == block_bytes
    again.release()
    # a capture that is dropped without release (a job dropped anywhere) gives its bytes back too
    cap = _captured(rows[:5], budget)
    assert budget.held_bytes == block_bytes
    del cap
    gc.collect()
    assert budget.held_bytes == 0


def test_a_capture_past_the_budget_keeps_nothing() -> None:
    v = 500
    rows = np.ones((BLOCK_ROWS + 1, v), dtype=np.float32)
    budget = CaptureBudget(BLOCK_ROWS * v * 4)  # one block: the 17th row needs a second
    other = RowCapture(v, budget)
    cap = _captured(rows, budget)
    assert cap.overflowed and not cap.usable(len(rows)) and budget.held_bytes == 0
    other.take(_ptr(rows[0]))  # the budget it gave back is there for the next request
    assert budget.held_bytes == BLOCK_ROWS * v * 4
    with pytest.raises(ValueError):
        CaptureBudget(-1)


@pytest.mark.parametrize("n", [1, BLOCK_ROWS - 1, BLOCK_ROWS, BLOCK_ROWS + 1, 3 * BLOCK_ROWS + 5])
def test_the_overlapped_kld_equals_exact_kld_row_by_row(n: int) -> None:
    """Every block boundary, in order: each reference row is the one decoded for its position."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(n)
    v = 4096
    ref = (3 * rng.standard_normal((n, v))).astype(np.float32)
    primary = (ref + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
    completion = rng.integers(0, v, n).tolist()
    budget = CaptureBudget(1 << 30)
    cap = _captured(primary, budget)
    decoded: list[tuple[int, int]] = []
    current = [0]

    def step(token: int, pos: int) -> None:
        decoded.append((token, pos))
        current[0] += 1

    with ThreadPoolExecutor(1) as pool:
        got = score_against_capture(
            7, completion, cap, step=step, row=lambda: _ptr(ref[current[0]]), executor=pool
        )
    assert decoded == [(completion[j - 1], 7 + j - 1) for j in range(1, n)]
    blocks = [
        exact_kld(ref[lo : lo + BLOCK_ROWS], primary[lo : lo + BLOCK_ROWS], completion[lo : lo + BLOCK_ROWS])
        for lo in range(0, n, BLOCK_ROWS)
    ]
    assert np.array_equal(got.kld, np.concatenate([b.kld for b in blocks]))  # each block its own rows
    assert np.array_equal(got.p_primary, np.concatenate([b.p_primary for b in blocks]))
    # row by row, as the replay computes it: float32 partial sums grouped otherwise, within 1e-6
    want = [exact_kld(ref[j : j + 1], primary[j : j + 1], completion[j : j + 1]) for j in range(n)]
    np.testing.assert_allclose(got.kld, [w.kld[0] for w in want], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.p_ref, [w.p_ref[0] for w in want], rtol=1e-6)
    assert list(got.same_top) == [bool(w.same_top[0]) for w in want]
    assert got.positions is not None and got.positions[0] == 7


def _present_pages(block: np.ndarray[Any, Any]) -> tuple[int, int]:
    """Pages of ``block`` mapped in memory now, and its pages (Linux's /proc/self/pagemap, bit 63)."""
    addr, size = block.ctypes.data, block.nbytes
    first = addr // PAGE_BYTES
    n = -(-(addr + size) // PAGE_BYTES) - first
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        words = np.frombuffer(f.read(n * 8), dtype=np.uint64)
    return int(((words >> np.uint64(63)) & np.uint64(1)).sum()), n


def _wait(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the refill thread did not get there"
        time.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's pagemap")
def test_reserve_blocks_are_faulted_in_before_a_capture_takes_them() -> None:
    """The point of the reserve: the generation thread copies into mapped pages only."""
    v = 70_000  # 4.3 MiB blocks: not a multiple of a page or a huge page
    lazy = np.frombuffer(mmap.mmap(-1, BLOCK_ROWS * v * 4), dtype=np.float32)
    assert _present_pages(lazy)[0] == 0  # the measure sees unfaulted memory as such
    block = prefaulted_block(BLOCK_ROWS, v)
    present, pages = _present_pages(block)
    assert block.shape == (BLOCK_ROWS, v) and present == pages
    assert block.ctypes.data % (2 << 20) == 0  # aligned for transparent huge pages

    block_bytes = BLOCK_ROWS * v * 4
    budget = CaptureBudget(10 * block_bytes)
    budget.prepare(BLOCK_ROWS, v)
    try:
        _wait(lambda: budget.refilled_blocks == RESERVE_BLOCKS)
        assert budget.idle_bytes == RESERVE_BLOCKS * block_bytes and budget.held_bytes == 0
        rows = np.random.default_rng(1).standard_normal((3 * BLOCK_ROWS, v)).astype(np.float32)
        cap = RowCapture(v, budget)
        cap.take(_ptr(rows[0]))  # the first row takes a block: one of the reserve, every page mapped
        present, pages = _present_pages(cap._blocks[0])
        assert present == pages
        for r in rows[1:]:
            cap.take(_ptr(r))
        assert np.array_equal(cap.rows(), rows) and budget.status()["fresh_blocks"] == 0
        assert budget.taken_blocks == 3
        # the refill thread replaces what the capture took, within the limit
        _wait(lambda: budget.refilled_blocks == RESERVE_BLOCKS + 3)
        assert budget.held_bytes == 3 * block_bytes and budget.idle_bytes == RESERVE_BLOCKS * block_bytes
        cap.release()  # kept up to the reserve; the rest is unmapped
        assert budget.held_bytes == 0 and budget.idle_bytes == RESERVE_BLOCKS * block_bytes
    finally:
        budget.close()
    assert budget.idle_bytes == 0 and budget._refill is None


def test_the_reserve_stays_inside_the_limit_and_fresh_blocks_are_counted() -> None:
    v = 1000
    block_bytes = BLOCK_ROWS * v * 4
    budget = CaptureBudget(3 * block_bytes)  # room for three blocks, reserve wanted: four
    budget.prepare(BLOCK_ROWS, v)
    try:
        _wait(lambda: budget.refilled_blocks == 3)
        time.sleep(0.05)  # a fourth would pass the limit: none comes
        assert budget.refilled_blocks == 3 and budget.idle_bytes == 3 * block_bytes
        rows = np.ones((4 * BLOCK_ROWS, v), dtype=np.float32)
        cap = _captured(rows[: 3 * BLOCK_ROWS], budget)  # all three ready blocks
        assert budget.held_bytes == 3 * block_bytes and budget.idle_bytes == 0
        assert budget.status()["fresh_blocks"] == 0
        cap.take(_ptr(rows[0]))  # a fourth block does not fit: the capture gives up, frees its own
        assert cap.overflowed and budget.held_bytes == 0
        # what it gave back is kept (touched again by the refill thread) and reused
        _wait(lambda: len(budget._ready) == 3)
        assert budget.idle_bytes == 3 * block_bytes
    finally:
        budget.close()
    small = CaptureBudget(block_bytes - 1)  # cannot hold one block: no reserve, no thread work
    small.prepare(BLOCK_ROWS, v)
    try:
        time.sleep(0.05)
        assert small.refilled_blocks == 0 and small.idle_bytes == 0
        assert small.take_block(BLOCK_ROWS, v) is None
    finally:
        small.close()
    cold = CaptureBudget(1 << 30)  # never prepared (or the reserve is used up): a fresh block, counted
    got = cold.take_block(BLOCK_ROWS, v)
    assert got is not None and cold.status()["fresh_blocks"] == 1


def test_touching_pages_maps_every_page_of_a_block() -> None:
    raw = np.frombuffer(mmap.mmap(-1, 5 * PAGE_BYTES + 8 * 100), dtype=np.float32)
    block = raw[3 : 3 + 5 * PAGE_BYTES // 4].reshape(5, -1)  # not page-aligned: six pages
    touch_pages(block)
    if Path("/proc/self/pagemap").exists():
        present, pages = _present_pages(block)
        assert present == pages == 6


def test_jobs_scored_as_one_pipeline_equal_one_job_a_call() -> None:
    """The pipeline across jobs: same KLD blocks, in order, each job its own positions; a job's last
    block is computed while the next job prefills (the worker is held until job 1's prefill: a
    pipeline that waited for job 0's tail first would never get there)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    v = 2048
    lengths = [5, BLOCK_ROWS + 3, 2 * BLOCK_ROWS, 1]
    budget = CaptureBudget(1 << 30)
    ref_rows, jobs, want = [], [], []
    for i, n in enumerate(lengths):
        ref = (3 * rng.standard_normal((n, v))).astype(np.float32)
        primary = (ref + 0.3 * rng.standard_normal((n, v))).astype(np.float32)
        completion = rng.integers(0, v, n).tolist()
        ref_rows.append(ref)
        jobs.append(CapturedJob(10 + i, completion, _captured(primary, budget)))
        want.append(
            [
                exact_kld(
                    ref[lo : lo + BLOCK_ROWS], primary[lo : lo + BLOCK_ROWS], completion[lo : lo + BLOCK_ROWS]
                )
                for lo in range(0, n, BLOCK_ROWS)
            ]
        )
    current = [0, 0]  # job, row
    calls: list[tuple[str, int, int]] = []
    gate = threading.Event()

    def prefill(i: int) -> None:
        calls.append(("prefill", i, 0))
        current[:] = [i, 0]
        if i == 1:
            gate.set()

    def step(token: int, pos: int) -> None:
        calls.append(("step", token, pos))
        current[1] += 1

    def row() -> Any:
        return _ptr(ref_rows[current[0]][current[1]])

    phases = Phases()
    buffers = BlockBuffers(v)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(gate.wait, 10.0)  # the KLD worker is busy until job 1 prefills
        got = score_captured_jobs(
            jobs, prefill=prefill, step=step, row=row, executor=pool, buffers=buffers, phases=phases
        )
        assert held.result() is True, "job 0's last KLD was waited for before job 1's prefill"
    expected_calls = []
    for i, job in enumerate(jobs):
        expected_calls.append(("prefill", i, 0))
        expected_calls += [
            ("step", job.completion[j - 1], job.prompt_len + j - 1) for j in range(1, len(job.completion))
        ]
    assert calls == expected_calls
    for g, w, job in zip(got, want, jobs, strict=True):
        assert np.array_equal(g.kld, np.concatenate([b.kld for b in w]))
        assert np.array_equal(g.p_ref, np.concatenate([b.p_ref for b in w]))
        assert g.first_position == job.prompt_len and len(g) == len(job.completion)
    assert phases.jobs == len(jobs) and phases.tokens == sum(lengths)
    assert all(value >= 0 for value in phases.ms_per_token().values())
    # one job a call: the same numbers
    with ThreadPoolExecutor(1) as pool:
        for i, (job, g) in enumerate(zip(jobs, got, strict=True)):
            alone = score_captured_jobs(
                [job], prefill=lambda _k, i=i: prefill(i), step=step, row=row, executor=pool, buffers=buffers
            )[0]
            assert np.array_equal(alone.kld, g.kld) and np.array_equal(alone.same_top, g.same_top)
    assert PIPELINE_JOBS > 1


def test_a_failed_decode_lets_the_kld_in_flight_finish_first() -> None:
    from concurrent.futures import ThreadPoolExecutor

    v = 512
    rows = np.ones((BLOCK_ROWS + 2, v), dtype=np.float32)
    cap = _captured(rows, CaptureBudget(1 << 30))
    job = CapturedJob(3, list(range(len(rows))), cap)
    finished: list[bool] = []

    def slow_kld(*args: Any) -> Any:
        time.sleep(0.2)
        finished.append(True)
        return exact_kld(*args)

    def step(token: int, pos: int) -> None:
        if token == BLOCK_ROWS:  # the decode after the first block's KLD went to the worker
            raise RuntimeError("llama_decode failed")

    with ThreadPoolExecutor(1) as pool:
        real_submit = pool.submit
        pool.submit = lambda fn, *a: real_submit(slow_kld, *a)  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            score_captured_jobs(
                [job],
                prefill=lambda _i: None,
                step=step,
                row=lambda: _ptr(rows[0]),
                executor=pool,
                buffers=BlockBuffers(v),
            )
        assert finished == [True]  # raised only once the block's KLD was done with the buffers


def test_sustainable_rate() -> None:
    assert sustainable_rate(None, 10.0) is None and sustainable_rate(0.01, 0.0) is None
    assert sustainable_rate(0.01, 50.0) == pytest.approx(2.0)  # 100 tokens/s of scoring for 50 generated
    c = ScoringCapacity(window=10.0)
    assert c.status()["sustainable_rate"] is None
    c.scored(100, 2.0)  # 20 ms a scored token
    c.request(now=0.0)
    c.request(now=1.0)
    estimated = c.status()  # proxy mode: 2 requests of 100 tokens in 10 s
    assert estimated["load_source"] == "estimated"
    assert estimated["sustainable_rate"] == pytest.approx(1 / (0.02 * 20.0))
    c.generated(250, now=2.0)
    c.generated(250, now=3.0)
    exact = c.status()
    assert exact["load_source"] == "generated" and exact["generated_tokens_per_second"] == 50.0
    assert exact["sustainable_rate"] == pytest.approx(1.0)
    c.generated(100, now=13.5)  # the window ends at the latest event: the first two are out
    assert c.status()["generated_tokens_per_second"] == 10.0


# ---- against the real model: captured rows are the replay's rows ----------------------------------


def _settings(gemma_path: Path, kv: T, **kw: Any) -> Settings:
    return Settings(
        model=gemma_path,
        ctx_size=512,
        batch_size=64,
        threads=THREADS_N,
        shadow_rate=0,
        cache_type_k=kv,
        cache_type_v=kv,
        **kw,
    )


def _serve(
    backend: EmbeddedBackend, n_tokens: int, start: int = 0
) -> tuple[list[int], list[int], RowCapture | None]:
    """One greedy generation with its rows captured (prompt longer than the batch: several calls),
    once the capture reserve is made (as it is while a server starts, before it takes requests)."""

    async def run() -> tuple[list[int], list[int], RowCapture | None]:
        if not backend.ready:
            await backend.load()
        budget = backend.capture_budget
        reserve = RESERVE_BLOCKS * BLOCK_ROWS * backend.n_vocab * 4
        if budget is not None and budget.limit_bytes >= reserve + budget.held_bytes:
            _wait(lambda: len(budget._ready) >= RESERVE_BLOCKS)  # else a starved refill: fresh blocks
        words = " ".join(english_text().split()[start : start + 90])
        prompt = backend.tokenize(words, add_bos=True)
        cap = backend.new_capture()
        request = GenerationRequest(
            prompt, max_tokens=n_tokens, sampling=SamplingParams(temperature=0.0), capture=cap
        )
        got = await collect(backend.generate(request))
        return prompt, list(got.done.token_ids), cap

    return asyncio.run(run())


@pytest.mark.parametrize("kv", [T.Q4_0, T.F16])
def test_captured_rows_score_as_the_replay_does(gemma_path: Path, kv: T) -> None:
    backend = EmbeddedBackend(_settings(gemma_path, kv), read_model_info(gemma_path))
    try:
        prompt, tokens, cap = _serve(backend, 24)  # two blocks of rows: 16 and 8
        assert cap is not None and cap.usable(len(tokens)) and len(tokens) > BLOCK_ROWS
        assert backend.capture_budget is not None
        assert backend.capture_budget.status()["fresh_blocks"] == 0  # the reserve's blocks only
        assert len(prompt) > 64  # the prompt went in two calls of the batch, as the replay does them
        scorer = make_scorer(backend, F16)
        assert scorer.path == "decode"
        replayed = scorer.score(prompt, tokens)
        captured = scorer.score_captured(ScoreRequest(prompt, tokens), cap)
        scorer.close()
    finally:
        backend.close()
    assert len(captured) == len(replayed) == len(tokens)
    mean_replay, mean_capture = float(np.mean(replayed.kld)), float(np.mean(captured.kld))
    print(f"\n{kv.value}: mean KLD replay {mean_replay:.6g}, captured {mean_capture:.6g}")
    if kv is T.F16:  # the served rows ARE the reference's: exactly 0, as the replay reads
        assert np.all(captured.kld == 0) and np.all(replayed.kld == 0)
        assert captured.same_top.all()
    else:
        assert mean_replay > 1e-3  # q4_0 costs something on Gemma
        assert abs(mean_capture - mean_replay) <= 5e-3 * mean_replay  # the 0.5 %
        # per position too: the same rows, only the KLD call's block shape differs
        np.testing.assert_allclose(captured.kld, replayed.kld, rtol=1e-5, atol=1e-9)
        assert np.array_equal(captured.same_top, replayed.same_top)


def test_out_of_budget_jobs_are_replayed_and_counted(gemma_path: Path) -> None:
    """A budget of 1 MiB holds no Gemma block (16 MiB): the capture overflows, the job is scored by
    the replay of both configs, counted as a fallback; a roomy budget scores against the capture."""
    backend = EmbeddedBackend(
        _settings(gemma_path, T.Q4_0, shadow_capture_mib=1), read_model_info(gemma_path)
    )
    try:
        prompt, tokens, cap = _serve(backend, 20)
        budget = backend.capture_budget
        assert cap is not None and budget is not None
        assert cap.overflowed and budget.held_bytes == 0
        scorer = ThreadedScorer(lambda: make_scorer(backend, F16))

        async def score(job: ShadowJob) -> Any:
            await scorer.start()
            return await scorer.score(job)

        fallback = asyncio.run(score(ShadowJob(tuple(prompt), tuple(tokens), captured=cap)))
        assert budget.status()["fallback_jobs"] == 1 and budget.status()["captured_jobs"] == 0
        roomy = CaptureBudget(64 << 20)
        good = RowCapture(cap.n_vocab, roomy)
        replay_scorer = make_scorer(backend, F16)
        # the rows the replay computes for the primary, taken into a capture of another budget
        want = replay_scorer.score(prompt, tokens)
        replay_scorer.close()
        backend_rows = _primary_rows(backend, prompt, tokens)
        for r in backend_rows:
            good.take(_ptr(r))
        captured = asyncio.run(score(ShadowJob(tuple(prompt), tuple(tokens), captured=good)))
        assert roomy.status()["captured_jobs"] == 1 and roomy.held_bytes == 0  # released after scoring
        scorer.close()
    finally:
        backend.close()
    np.testing.assert_allclose(fallback.kld, want.kld, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(captured.kld, want.kld, rtol=1e-5, atol=1e-9)


def test_queued_captured_jobs_are_scored_as_one_pipeline(gemma_path: Path) -> None:
    """The shadow worker hands up to PIPELINE_JOBS queued jobs over at once; their captured scores
    equal one job a call's, and every captured block goes back to the budget."""
    backend = EmbeddedBackend(_settings(gemma_path, T.Q4_0), read_model_info(gemma_path))
    try:
        served = [_serve(backend, n, start) for n, start in ((20, 0), (35, 300))]
        budget = backend.capture_budget
        assert budget is not None and budget.status()["fresh_blocks"] == 0
        scorer = ThreadedScorer(lambda: make_scorer(backend, F16))

        async def run() -> tuple[int, list[Any], list[Any]]:
            s = await scorer.start()
            alone = [s.score_captured(ScoreRequest(p, t), c) for p, t, c in served if c is not None]
            jobs = [ShadowJob(tuple(p), tuple(t), captured=c) for p, t, c in served]
            return scorer.max_jobs, alone, list(await scorer.score_many(jobs))

        max_jobs, alone, together = asyncio.run(run())
        scorer.close()
        assert max_jobs == PIPELINE_JOBS
        assert budget.held_bytes == 0 and budget.status()["captured_jobs"] == 2
    finally:
        backend.close()
    assert budget._refill is None  # closing the backend stopped the refill thread
    for a, b in zip(alone, together, strict=True):
        assert np.array_equal(a.kld, b.kld) and np.array_equal(a.same_top, b.same_top)
        assert a.first_position == b.first_position


def _primary_rows(backend: EmbeddedBackend, prompt: list[int], tokens: list[int]) -> np.ndarray[Any, Any]:
    """The primary config's decode-path rows, through a scorer's primary context."""
    scorer = make_scorer(backend, F16)
    ctx = scorer._ctx_primary
    try:
        scorer._prefill_prompt(ctx, prompt, 0)
        rows = [np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(scorer.n_vocab,)).copy()]
        for j in range(1, len(tokens)):
            scorer._fill([tokens[j - 1]], [len(prompt) + j - 1], [0], 1)
            ctx.decode(scorer._batch)
            rows.append(np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(scorer.n_vocab,)).copy())
    finally:
        scorer.close()
    return np.stack(rows)
