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

Why a reserve of pre-faulted blocks: the copy is on the client's path, and copying into fresh memory
is mostly page faults, not bandwidth (on an H100 host 0.28 ms a 1 MiB row, +13.6 % generation time
for a sampled Gemma request). Blocks come back only after their job is scored, so with jobs queued
every block a capture takes would be fresh. The budget therefore keeps :data:`RESERVE_BLOCKS` blocks
ready, inside the limit, and a background thread (SCHED_IDLE) refills the reserve whenever a capture
takes one: it maps the block, asks for transparent huge pages, and touches every page, so the
generation thread only ever copies into mapped memory. Only when the reserve is empty (a burst the
refill did not keep up with, or a budget too small to hold one) does the generation thread take a
fresh block, counted in ``fresh_blocks``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

from kvproxy.priority import lower_thread_priority

BLOCK_ROWS = 16  # rows per block: 16 MiB for Gemma's 262,144-token vocabulary
RESERVE_BLOCKS = 4  # pre-faulted blocks kept ready for the next captures (64 MiB for Gemma)
PAGE_BYTES = mmap.PAGESIZE
HUGE_PAGE_BYTES = 2 << 20  # x86-64's transparent huge page


def prefaulted_block(rows: int, n_vocab: int) -> npt.NDArray[np.float32]:
    """A zeroed ``rows`` x ``n_vocab`` float32 block whose pages are all mapped now.

    Its own anonymous mapping, 2 MiB aligned and advised ``MADV_HUGEPAGE`` where the kernel has it
    (one fault per 2 MiB instead of 512, when it grants huge pages), then one byte written in every
    page. Slow (the faults are taken here): for the refill thread, never the generation thread.
    Unmapped when the array is garbage-collected."""
    size = rows * n_vocab * 4
    mapping = mmap.mmap(-1, size + HUGE_PAGE_BYTES)  # room to align the block to a huge page
    raw = np.frombuffer(mapping, dtype=np.uint8)
    offset = (-raw.ctypes.data) % HUGE_PAGE_BYTES
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            mapping.madvise(advice, offset, size)
    raw[offset : offset + size : PAGE_BYTES] = 0  # fault in every page now
    return raw[offset : offset + size].view(np.float32).reshape(rows, n_vocab)


def touch_pages(block: npt.NDArray[np.float32]) -> None:
    """Write one byte in every page of a C-contiguous block (a zero: its contents are not kept), so
    none faults when the rows are copied in: every whole page-sized window holds one written byte,
    and the last byte covers a page the block only starts."""
    flat = block.reshape(-1).view(np.uint8)
    flat[::PAGE_BYTES] = 0
    flat[-1:] = 0


class CaptureBudget:
    """Bytes of captured rows the whole process may hold, shared by all sampled requests.

    ``held_bytes`` are in captures; ``idle_bytes`` are blocks kept mapped for the next captures (the
    reserve, and released blocks kept for reuse), all inside ``limit_bytes``: an idle block is
    dropped when a capture needs its room. After :meth:`prepare` (the block shape, known once the
    model is loaded) a background thread keeps ``reserve_blocks`` blocks ready, every page faulted
    in (:func:`prefaulted_block`; a released block has its pages touched again, since a job's last
    block is usually part-written), refilling after every take; :meth:`close` stops it. Without
    :meth:`prepare`, released blocks are reused as they come. Thread-safe: the slot scheduler's
    thread takes, the shadow worker's thread gives back, the refill thread adds."""

    def __init__(self, limit_bytes: int, reserve_blocks: int = RESERVE_BLOCKS) -> None:
        if limit_bytes < 0 or reserve_blocks < 0:
            raise ValueError("a capture budget and its reserve cannot be negative")
        self.limit_bytes = limit_bytes
        self.reserve_blocks = reserve_blocks
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the refill thread waits on it
        self.held_bytes = 0  # blocks in captures
        self._ready: list[npt.NDArray[np.float32]] = []  # idle, every page mapped
        self._returned: list[npt.NDArray[np.float32]] = []  # idle, released: the refill thread touches them
        self._shape: tuple[int, int] | None = None  # the blocks the reserve is kept for
        self._filling = 0  # blocks the refill thread is making now
        self._touching_bytes = 0  # a returned block the refill thread is touching now
        self._refill: threading.Thread | None = None
        self._closed = False
        self.captured_jobs = 0  # jobs scored against their captured rows
        self.fallback_jobs = 0  # jobs whose capture ran out of budget: scored by replay
        self.fresh_blocks = 0  # blocks the generation thread took not pre-faulted: it took the faults
        self.refilled_blocks = 0  # blocks the refill thread made
        self.taken_blocks = 0  # blocks captures took, fresh or not

    @property
    def idle_bytes(self) -> int:
        idle = sum(b.nbytes for b in self._ready) + sum(b.nbytes for b in self._returned)
        return idle + self._touching_bytes

    def prepare(self, rows: int, n_vocab: int) -> None:
        """Keep ``reserve_blocks`` blocks of ``rows`` x ``n_vocab`` ready from now on (starts the
        refill thread once; a budget that cannot hold such a block keeps none)."""
        with self._lock:
            if self._closed or self.reserve_blocks == 0:
                return
            self._shape = (rows, n_vocab)
            if self._refill is None:
                self._refill = threading.Thread(
                    target=self._refill_loop, name="kvproxy-capture-refill", daemon=True
                )
                self._refill.start()
            self._wake.notify()

    def close(self) -> None:
        """Stop the refill thread (after the block it is making) and drop the idle blocks."""
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._returned.clear()
            self._wake.notify()
            thread, self._refill = self._refill, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def take_block(self, rows: int, n_vocab: int) -> npt.NDArray[np.float32] | None:
        """A block of ``rows`` x ``n_vocab`` float32, or None when it would pass the limit: a ready
        one when there is one (no page faults), else a released one, else a fresh allocation (those
        two counted in ``fresh_blocks``: their pages fault in as the rows are copied)."""
        size = rows * n_vocab * 4
        with self._lock:
            for pool in (self._ready, self._returned):
                for i, block in enumerate(pool):
                    if block.shape == (rows, n_vocab):
                        self.held_bytes += size
                        self.taken_blocks += 1
                        self.fresh_blocks += pool is self._returned
                        self._wake.notify()  # the refill thread makes another
                        return pool.pop(i)
            while self.held_bytes + self.idle_bytes + size > self.limit_bytes and (
                self._ready or self._returned
            ):
                (self._returned or self._ready).pop()  # blocks of another shape make room
            if self.held_bytes + size > self.limit_bytes:
                return None
            self.held_bytes += size
            self.taken_blocks += 1
            self.fresh_blocks += 1
            self._wake.notify()
        return np.empty((rows, n_vocab), dtype=np.float32)

    def give_blocks(self, blocks: list[npt.NDArray[np.float32]]) -> None:
        """Take back a capture's blocks (emptying its list), keeping up to the reserve for reuse."""
        with self._lock:
            for block in blocks:
                self.held_bytes -= block.nbytes
                if not self._closed and len(self._ready) + len(self._returned) < self.reserve_blocks:
                    (self._returned if self._refill is not None else self._ready).append(block)
            blocks.clear()
            self._wake.notify()

    def _next_job(self) -> str:
        """What the refill thread does next (lock held): ``touch`` a returned block, ``make`` a
        block of the reserve, or ``wait``."""
        if self._closed:
            return "stop"
        if self._returned:
            return "touch"
        if self._shape is None:
            return "wait"
        rows, n_vocab = self._shape
        size = rows * n_vocab * 4
        ready = sum(1 for b in self._ready if b.shape == self._shape)
        if ready + self._filling >= self.reserve_blocks:
            return "wait"
        if self.held_bytes + self.idle_bytes + (self._filling + 1) * size > self.limit_bytes:
            return "wait"
        return "make"

    def _refill_loop(self) -> None:
        lower_thread_priority()  # faults are work that serving does not wait for
        with self._lock:
            while True:
                job = self._next_job()
                if job == "stop":
                    return
                if job == "wait":
                    self._wake.wait()
                elif job == "touch":
                    block = self._returned.pop()
                    self._touching_bytes = block.nbytes
                    self._lock.release()
                    try:
                        touch_pages(block)
                    finally:
                        self._lock.acquire()
                        self._touching_bytes = 0
                    if not self._closed:
                        self._ready.append(block)
                else:
                    self._make_one()

    def _make_one(self) -> None:
        """One reserve block, made with the lock released (lock held on entry and exit)."""
        assert self._shape is not None
        shape = self._shape
        self._filling += 1
        self._lock.release()
        try:
            block: npt.NDArray[np.float32] | None = prefaulted_block(*shape)
        except (MemoryError, OSError):  # pragma: no cover - the host is out of memory
            block = None
        finally:
            self._lock.acquire()
            self._filling -= 1
        if block is None:
            self._wake.wait(1.0)  # try again later; captures take fresh blocks meanwhile
            return
        fits = self.held_bytes + self.idle_bytes + block.nbytes <= self.limit_bytes
        if not self._closed and shape == self._shape and fits:
            self._ready.append(block)
            self.refilled_blocks += 1

    def count(self, captured: bool) -> None:
        with self._lock:
            if captured:
                self.captured_jobs += 1
            else:
                self.fallback_jobs += 1

    def status(self) -> dict[str, int]:
        with self._lock:
            return {
                "limit_bytes": self.limit_bytes,
                "held_bytes": self.held_bytes,
                "idle_bytes": self.idle_bytes,
                "captured_jobs": self.captured_jobs,
                "fallback_jobs": self.fallback_jobs,
                "fresh_blocks": self.fresh_blocks,
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
