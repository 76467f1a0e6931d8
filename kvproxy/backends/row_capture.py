"""The served logits rows of a shadow-sampled request, kept so scoring need not replay the primary.

In embedded mode the primary's row for every generated token exists at generation time: the slot
scheduler samples from it. Keeping it (one ``ctypes.memmove`` of ``n_vocab`` float32 into a
preallocated block, no Python loop over the vocabulary) lets the scorer decode only the f16
reference and compare against the rows that actually served the tokens, batched slots included.
With one slot those are bit for bit the rows the decode path's replay of the primary computes
(kvproxy.backends.slots), so the KLD is unchanged (tests/test_row_capture.py).

Memory is bounded by one process-wide :class:`CaptureBudget` (``shadow_capture_mib``): rows are
kept in blocks of :data:`BLOCK_ROWS`, each block taken from the budget when the previous one is full.
A request whose next block does not fit stops capturing and frees what it held at once; its job is
then scored by today's replay of the primary config and counted as a fallback. A capture gives its
blocks back when it is released (after scoring) or garbage-collected (a job dropped anywhere).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

BLOCK_ROWS = 16  # rows per block: 16 MiB for Gemma's 262,144-token vocabulary


class CaptureBudget:
    """Bytes of captured rows the whole process may hold, shared by all sampled requests.

    Thread-safe: the slot scheduler's thread takes, the shadow worker's thread gives back."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError("a capture budget cannot be negative")
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self.held_bytes = 0
        self.captured_jobs = 0  # jobs scored against their captured rows
        self.fallback_jobs = 0  # jobs whose capture ran out of budget: scored by replay

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held_bytes + n > self.limit_bytes:
                return False
            self.held_bytes += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held_bytes -= n

    def count(self, captured: bool) -> None:
        with self._lock:
            if captured:
                self.captured_jobs += 1
            else:
                self.fallback_jobs += 1

    def status(self) -> dict[str, int]:
        return {
            "limit_bytes": self.limit_bytes,
            "held_bytes": self.held_bytes,
            "captured_jobs": self.captured_jobs,
            "fallback_jobs": self.fallback_jobs,
        }


def _give_back(budget: CaptureBudget, held: list[int]) -> None:
    if held[0]:
        budget.give(held[0])
        held[0] = 0


class RowCapture:
    """One request's served rows, in generation order: row j is the one ``completion[j]`` was
    sampled from (the prompt's last row for j = 0), end-of-generation token included."""

    def __init__(self, n_vocab: int, budget: CaptureBudget, block_rows: int = BLOCK_ROWS) -> None:
        self.n_vocab = n_vocab
        self.block_rows = block_rows
        self._row_bytes = n_vocab * 4
        self.budget = budget
        self._blocks: list[npt.NDArray[np.float32]] = []
        self.n_rows = 0
        self.overflowed = False  # a block did not fit the budget: nothing is kept
        self._held = [0]  # bytes taken from the budget (a list: the finalizer shares it)
        self._finalizer = weakref.finalize(self, _give_back, budget, self._held)

    def take(self, row: Any) -> None:
        """Copy one row (a ``float*`` from ``llama_get_logits_ith``) into the current block."""
        if self.overflowed:
            return
        k = self.n_rows % self.block_rows
        if k == 0:
            size = self.block_rows * self._row_bytes
            if not self.budget.take(size):
                self.overflowed = True
                self.release()
                return
            self._held[0] += size
            self._blocks.append(np.empty((self.block_rows, self.n_vocab), dtype=np.float32))
        block = self._blocks[-1]
        ctypes.memmove(block.ctypes.data + k * self._row_bytes, row, self._row_bytes)
        self.n_rows += 1

    def block(self, i: int) -> npt.NDArray[np.float32]:
        """Rows ``i * block_rows`` to ``(i + 1) * block_rows`` (the last block: up to ``n_rows``)."""
        return self._blocks[i][: min(self.block_rows, self.n_rows - i * self.block_rows)]

    def rows(self) -> npt.NDArray[np.float32]:
        """All rows as one array (a copy: tests and small jobs)."""
        if not self._blocks:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(self._blocks)[: self.n_rows]

    def usable(self, n_completion: int) -> bool:
        """Whether these rows can stand for a job of ``n_completion`` tokens."""
        return not self.overflowed and self.n_rows == n_completion

    def release(self) -> None:
        """Free the blocks and give their bytes back (idempotent)."""
        self._blocks = []
        _give_back(self.budget, self._held)
