"""Decode-path scoring against captured rows: only the reference decodes, the KLD overlaps the next step.

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

Memory: the two reference blocks (2 x BLOCK_ROWS x 4 bytes a logit: 32 MiB for Gemma) plus
exact_kld's fixed temporaries; the captured rows are counted in the capture budget.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kvproxy.backends.row_capture import RowCapture
from kvproxy.kld import PositionScores, exact_kld

Step = Callable[[int, int], None]  # decode one token at a position (logits on), in the reference
Row = Callable[[], Any]  # the reference's last row, a float*


def score_against_capture(
    prompt_len: int,
    completion: Sequence[int],
    capture: RowCapture,
    *,
    step: Step,
    row: Row,
    executor: ThreadPoolExecutor,
) -> PositionScores:
    """Scores of ``completion`` (the reference's prompt already prefilled, its last row ready).

    ``step(token, pos)`` decodes one token; ``row()`` points at the row it produced."""
    n, rows_per_block, v = len(completion), capture.block_rows, capture.n_vocab
    if not capture.usable(n):
        raise ValueError(f"{capture.n_rows} captured rows for {n} completion tokens")
    row_bytes = v * 4
    buffers = [np.empty((rows_per_block, v), dtype=np.float32) for _ in range(2)]
    pending: list[Future[PositionScores] | None] = [None, None]
    parts: list[PositionScores] = []
    targets = np.asarray(completion, dtype=np.int64)
    try:
        for j in range(n):
            if j > 0:
                step(completion[j - 1], prompt_len + j - 1)
            b, k = divmod(j, rows_per_block)
            buf = buffers[b % 2]
            if k == 0 and (earlier := pending[b % 2]) is not None:
                parts.append(earlier.result())  # the block that used this buffer is done
                pending[b % 2] = None
            ctypes.memmove(buf.ctypes.data + k * row_bytes, row(), row_bytes)
            if k == rows_per_block - 1 or j == n - 1:
                lo = b * rows_per_block
                pending[b % 2] = executor.submit(
                    exact_kld, buf[: k + 1], capture.block(b), targets[lo : lo + k + 1]
                )
        last = (n - 1) // rows_per_block
        for i in (last - 1, last):  # the older block first
            f = pending[i % 2]
            if f is not None:
                parts.append(f.result())
                pending[i % 2] = None
    finally:
        for f in pending:  # a failed decode: let the KLD finish before the buffers go
            if f is not None:
                f.exception()
    return PositionScores.concat(parts).at(prompt_len)
