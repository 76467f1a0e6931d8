"""The served logits rows of a shadow-sampled request, kept so scoring need not replay the primary.

In embedded mode the primary's row for every generated token exists at generation time: the slot
scheduler samples from it. Keeping it (one ``ctypes.memmove`` of ``n_vocab`` float32 into a
preallocated block, no Python loop over the vocabulary) lets the scorer decode only the f16
reference and compare against the rows that actually served the tokens, batched slots included.
With one slot those are bit for bit the rows the decode path's replay of the primary computes
(kvproxy.backends.slots), so the KLD is unchanged (tests/test_row_capture.py).

Memory is bounded by one process-wide :class:`CaptureBudget` (``shadow_capture_mib``): rows are
kept in blocks of :data:`BLOCK_ROWS`, each block taken from the budget when the previous one is full
(released blocks are reused: no fresh pages to fault in on the generation thread).
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
IDLE_BLOCKS = 4  # released blocks kept mapped for the next request (64 MiB for Gemma)


class CaptureBudget:
    """Bytes of captured rows the whole process may hold, shared by all sampled requests.

    Up to :data:`IDLE_BLOCKS` released blocks are kept for the next request (inside the limit), so
    that the generation thread copies into memory already mapped instead of faulting in the fresh
    pages of a new allocation. Thread-safe: the slot scheduler's thread takes, the shadow worker's
    thread gives back."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError("a capture budget cannot be negative")
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self.held_bytes = 0  # blocks in captures
        self._idle: list[npt.NDArray[np.float32]] = []  # released blocks kept for reuse
        self.captured_jobs = 0  # jobs scored against their captured rows
        self.fallback_jobs = 0  # jobs whose capture ran out of budget: scored by replay

    @property
    def idle_bytes(self) -> int:
        return sum(b.nbytes for b in self._idle)

    def take_block(self, rows: int, n_vocab: int) -> npt.NDArray[np.float32] | None:
        """A block of ``rows`` x ``n_vocab`` float32, or None when it would pass the limit."""
        size = rows * n_vocab * 4
        with self._lock:
            for i, block in enumerate(self._idle):
                if block.shape == (rows, n_vocab):
                    self.held_bytes += size
                    return self._idle.pop(i)
            while self._idle and self.held_bytes + self.idle_bytes + size > self.limit_bytes:
                self._idle.pop()  # blocks of another shape make room
            if self.held_bytes + size > self.limit_bytes:
                return None
            self.held_bytes += size
        return np.empty((rows, n_vocab), dtype=np.float32)

    def give_blocks(self, blocks: list[npt.NDArray[np.float32]]) -> None:
        """Take back a capture's blocks (emptying its list), keeping a few for reuse."""
        with self._lock:
            for block in blocks:
                self.held_bytes -= block.nbytes
                if len(self._idle) < IDLE_BLOCKS:
                    self._idle.append(block)
            blocks.clear()

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
            "idle_bytes": self.idle_bytes,
            "captured_jobs": self.captured_jobs,
            "fallback_jobs": self.fallback_jobs,
        }


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
        # a capture dropped without release (a job dropped anywhere) gives its blocks back too
        self._finalizer = weakref.finalize(self, budget.give_blocks, self._blocks)

    def take(self, row: Any) -> None:
        """Copy one row (a ``float*`` from ``llama_get_logits_ith``) into the current block."""
        if self.overflowed:
            return
        k = self.n_rows % self.block_rows
        if k == 0:
            block = self.budget.take_block(self.block_rows, self.n_vocab)
            if block is None:
                self.overflowed = True
                self.release()
                return
            self._blocks.append(block)
        ctypes.memmove(self._blocks[-1].ctypes.data + k * self._row_bytes, row, self._row_bytes)
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
        """Give the blocks back to the budget (idempotent)."""
        self.budget.give_blocks(self._blocks)
