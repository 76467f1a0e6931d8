"""Decode-path scoring against captured rows: only the reference decodes, the KLD overlaps the decodes.

Why: the decode path replays BOTH the primary's KV config and the reference, one token per
``llama_decode``, and computed the full-vocabulary KLD on the CPU between steps, which cost 1.82x
generation per scored token on an H100. In embedded mode the primary's rows already exist: the slot
scheduler captured the row each served token was sampled from (kvproxy.backends.row_capture). So
here the reference alone is decoded, exactly as the decode path does it (the prompt as generation fed
it, then one token a call), and each reference row is copied out (one ``memmove``) into one of two
block buffers; when a block of :data:`~kvproxy.backends.row_capture.BLOCK_ROWS` rows is full its
KLD against the matching captured block is computed on a worker thread while the next block
decodes (``llama_decode`` and numpy's reductions release the GIL). Per position the numbers are
:func:`kvproxy.kld.exact_kld`'s, as on the replay path: only the block shape of the call differs.

Several jobs are one pipeline (:func:`score_captured_jobs`): the two buffers alternate across jobs,
so a job's last blocks' KLD runs while the next job's prompt prefills and its first block decodes,
instead of the scorer waiting for it at every job's end; only the last job's last block is waited
for with nothing to overlap. Each block's KLD is the same call on the same rows either way.

The buffers (:class:`BlockBuffers`) are made once per scorer and every page faulted in then: buffers
made per job cost page faults on the scoring thread for their first two blocks, 2 x 16 MiB for Gemma
(about 9 ms a job at the 3.6 GB/s the capture's fresh blocks were faulted at on an H100 host).

Memory: the two reference blocks (2 x BLOCK_ROWS x 4 bytes a logit: 32 MiB for Gemma), kept for the
scorer's life, plus exact_kld's fixed temporaries; the captured rows are counted in the capture budget.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from kvproxy.backends.row_capture import BLOCK_ROWS, RowCapture, prefaulted_block
from kvproxy.kld import PositionScores, exact_kld

Step = Callable[[int, int], None]  # decode one token at a position (logits on), in the reference
Row = Callable[[], Any]  # the reference's last row, a float*
Prefill = Callable[[int], None]  # clear the reference's cache and prefill job i's prompt
PIPELINE_JOBS = 4  # queued jobs the shadow worker hands over in one pipeline (kvproxy.scoring.scorers)


@dataclass
class Phases:
    """Where captured scoring's time goes, in seconds (optional: benchmarks/scoring_cost.py).

    ``prefill`` includes the wait for the prompt's last row; ``sync`` is the wait for each completion
    row (``llama_get_logits_ith``: on a GPU, llama_decode returns before the device is done, so the
    device's time shows here rather than in ``decode``); ``kld_wait`` is the scoring thread waiting
    for the KLD worker before reusing a block buffer; ``tail`` the wait for the last blocks' KLD once
    every job has decoded; ``other`` the rest (Python between the calls)."""

    prefill: float = 0.0
    decode: float = 0.0
    sync: float = 0.0
    copy: float = 0.0
    kld_wait: float = 0.0
    tail: float = 0.0
    other: float = 0.0
    jobs: int = 0
    tokens: int = 0

    def add(self, other: Phases) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def ms_per_token(self) -> dict[str, float]:
        """Each phase's milliseconds per scored token."""
        n = max(self.tokens, 1)
        return {
            f.name: 1e3 * getattr(self, f.name) / n for f in fields(self) if f.name not in ("jobs", "tokens")
        }


class BlockBuffers:
    """The two reference block buffers of one scorer, pre-faulted once and reused for every job."""

    def __init__(self, n_vocab: int, rows: int = BLOCK_ROWS) -> None:
        self.n_vocab = n_vocab
        self.rows = rows
        self.buffers: list[npt.NDArray[np.float32]] = [prefaulted_block(rows, n_vocab) for _ in range(2)]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


@dataclass(frozen=True)
class CapturedJob:
    """One job to score: the prompt's length (its position), the completion, the served rows."""

    prompt_len: int
    completion: Sequence[int]
    capture: RowCapture


def score_captured_jobs(
    jobs: Sequence[CapturedJob],
    *,
    prefill: Prefill,
    step: Step,
    row: Row,
    executor: ThreadPoolExecutor,
    buffers: BlockBuffers,
    phases: Phases | None = None,
) -> list[PositionScores]:
    """Scores of every job, in order. ``prefill(i)`` prefills job i's prompt in the reference (its
    last row ready), ``step(token, pos)`` decodes one token, ``row()`` points at the row it produced.
    Every capture must be usable for its completion (checked first: a ValueError before any decode).

    Block g of the whole run (counting every job's blocks in order) goes to buffer g % 2; a buffer is
    reused only once the KLD of the block it held is done, so the KLD of a job's last block overlaps
    the next job's prefill and first block. On a failure the KLDs in flight finish before it raises
    (their buffers and captured blocks must outlive them)."""
    for job in jobs:
        if not job.capture.usable(len(job.completion)):
            raise ValueError(
                f"{job.capture.n_rows} captured rows for {len(job.completion)} completion tokens"
            )
        if job.capture.n_vocab != buffers.n_vocab or job.capture.block_rows != buffers.rows:
            raise ValueError("the captured blocks' shape is not the scorer's")
    rows_per_block, row_bytes = buffers.rows, buffers.n_vocab * 4
    timed = phases is not None
    clock = time.perf_counter
    started = clock() if timed else 0.0
    t = Phases()
    pending: list[tuple[Future[PositionScores], int, int] | None] = [None, None]  # future, job, block
    parts: list[dict[int, PositionScores]] = [{} for _ in jobs]

    def collect(slot: int) -> None:
        entry = pending[slot]
        if entry is not None:
            future, i, b = entry
            pending[slot] = None
            parts[i][b] = future.result()

    g0 = 0  # the run's index of this job's first block
    try:
        for i, job in enumerate(jobs):
            completion, capture = job.completion, job.capture
            n = len(completion)
            if n == 0:
                continue
            targets = np.asarray(completion, dtype=np.int64)
            t0 = clock() if timed else 0.0
            prefill(i)
            if timed:
                t.prefill += clock() - t0
            for j in range(n):
                if j > 0:
                    if timed:
                        t1 = clock()
                        step(completion[j - 1], job.prompt_len + j - 1)
                        t.decode += clock() - t1
                    else:
                        step(completion[j - 1], job.prompt_len + j - 1)
                b, k = divmod(j, rows_per_block)
                slot = (g0 + b) % 2
                if k == 0 and pending[slot] is not None:
                    t1 = clock() if timed else 0.0
                    collect(slot)  # the block that used this buffer is done
                    if timed:
                        t.kld_wait += clock() - t1
                buf = buffers.buffers[slot]
                if timed:
                    t1 = clock()
                    src = row()
                    t2 = clock()
                    ctypes.memmove(buf.ctypes.data + k * row_bytes, src, row_bytes)
                    t3 = clock()
                    if j == 0:
                        t.prefill += t2 - t1  # the prompt's row: the wait for the prefill's calls
                    else:
                        t.sync += t2 - t1
                    t.copy += t3 - t2
                else:
                    ctypes.memmove(buf.ctypes.data + k * row_bytes, row(), row_bytes)
                if k == rows_per_block - 1 or j == n - 1:
                    lo = b * rows_per_block
                    future = executor.submit(
                        exact_kld, buf[: k + 1], capture.block(b), targets[lo : lo + k + 1]
                    )
                    pending[slot] = (future, i, b)
            g0 += (n - 1) // rows_per_block + 1
        t1 = clock() if timed else 0.0
        for slot in (g0 % 2, (g0 + 1) % 2):  # the older block first
            collect(slot)
        if timed:
            t.tail += clock() - t1
    finally:
        for entry in pending:  # a failed decode: let the KLD finish before the buffers go
            if entry is not None:
                entry[0].exception()
    if phases is not None:
        t.jobs, t.tokens = len(jobs), sum(len(job.completion) for job in jobs)
        measured = t.prefill + t.decode + t.sync + t.copy + t.kld_wait + t.tail
        t.other = clock() - started - measured
        phases.add(t)
    return [
        PositionScores.concat([p[b] for b in sorted(p)]).at(job.prompt_len)
        for p, job in zip(parts, jobs, strict=True)
    ]


def score_against_capture(
    prompt_len: int,
    completion: Sequence[int],
    capture: RowCapture,
    *,
    step: Step,
    row: Row,
    executor: ThreadPoolExecutor,
    buffers: BlockBuffers | None = None,
) -> PositionScores:
    """One job's scores (the reference's prompt already prefilled, its last row ready):
    :func:`score_captured_jobs` for a single job. ``step(token, pos)`` decodes one token; ``row()``
    points at the row it produced."""
    if buffers is None:
        buffers = BlockBuffers(capture.n_vocab, capture.block_rows)
    job = CapturedJob(prompt_len, completion, capture)
    return score_captured_jobs(
        [job], prefill=lambda _i: None, step=step, row=row, executor=executor, buffers=buffers
    )[0]
