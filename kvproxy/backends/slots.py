"""Slots for the embedded backend: several requests decoded together in one llama.cpp context.

As llama-server does with ``-np N`` and no ``--kv-unified``: one context with ``n_seq_max`` N, each
sequence its own KV stream of ``n_ctx`` cells (so a request may use the whole ``--ctx-size`` whatever
N is, and the KV cache is N times one context's). One thread owns the context and runs a loop:

1. Waiting requests take free slots in arrival order (a sampler chain is made for each, and freed
   when it leaves: kvproxy.backends.sampling).
2. One batch is built: one token for every sequence that is generating, then prompt tokens of the
   sequences still filling their prompt. With nothing generating a prompt goes in calls of
   ``n_batch`` tokens (as ``Llama.eval`` made them, and as the decode-path scorer replays); while
   other sequences generate, at most ``prefill_chunk`` prompt tokens join each call, so a long
   prompt delays running streams by one short chunk a token instead of its whole fill.
3. One ``llama_decode``; every sequence with an output row samples its token, which its
   :class:`~kvproxy.backends.sequence.SequenceOutput` turns into events.
4. A sequence that ends, or whose client left (checked before every call), frees its slot and its
   KV cells at once.

With one slot this is exactly what generation computed before (prompt in ``n_batch`` calls, then one
token a call), so the decode-path scorer reproduces the served rows bit for bit. With several, rows
are computed in batches of other shapes (llama.cpp splits a multi-stream batch into equal-length
micro-batches by sequence), which changes the served numerics: docs/benchmarks.md measures by how
much.

Waiting requests are bounded: past ``max_queue`` a request is refused at once (:class:`QueueFull`),
and the caller gives up on one that waits too long (:class:`QueueTimeout`); both are
:class:`Overloaded` errors carrying a Retry-After estimate.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from kvproxy.backends.base import BackendError, GenerationRequest, Overloaded
from kvproxy.backends.grammar_child import CHECK_STACK_BYTES
from kvproxy.backends.sampling import SamplerChain
from kvproxy.backends.sequence import SequenceOutput

log = logging.getLogger(__name__)

RETRY_AFTER_MAX = 60  # seconds; the openai SDK honours a Retry-After of up to 60 s
# The scheduler's thread parses each request's grammar (llama.cpp recurses once per nested group).
# The grammar compiler's child parsed it first on a stack of a quarter of this, so a grammar that
# would overflow this stack overflowed that one first and never got here (kvproxy.backends.grammar_child).
SLOT_STACK_BYTES = 4 * CHECK_STACK_BYTES


class QueueFull(Overloaded):
    pass


class QueueTimeout(Overloaded):
    pass


class ShuttingDown(BackendError):
    pass


@dataclass(frozen=True)
class SlotConfig:
    n_slots: int
    n_ctx: int  # cells per slot: a request's prompt plus completion
    n_batch: int  # tokens per llama_decode call
    n_ubatch: int
    prefill_chunk: int  # prompt tokens per call while other sequences generate
    threads: int
    flash_attn: bool
    type_k: int  # ggml types
    type_v: int
    max_queue: int  # requests waiting for a slot at most


@dataclass(eq=False)
class Entry:
    """One request on its way through the scheduler."""

    request: GenerationRequest
    output: SequenceOutput
    cancel: threading.Event
    on_admit: Callable[[], None] = lambda: None
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Sequence:
    """An entry holding a slot: its sequence id, sampler and progress."""

    entry: Entry
    seq: int
    sampler: SamplerChain
    admitted: float
    n_past: int = 0  # cells of this sequence filled so far
    next_token: int = -1  # sampled, not yet decoded

    @property
    def prompt(self) -> list[int]:
        return self.entry.request.prompt_tokens

    @property
    def generating(self) -> bool:
        return self.n_past >= len(self.prompt)


class SlotScheduler:
    """Owns one llama.cpp context on the loaded model and the thread that decodes in it."""

    def __init__(self, model: Any, config: SlotConfig, n_vocab: int) -> None:
        if config.n_slots < 1 or config.prefill_chunk < 1 or config.max_queue < 0:
            raise ValueError("slots and prefill_chunk must be at least 1, max_queue at least 0")
        self.config = config
        self._model = model  # llama_cpp._internals.LlamaModel
        self._n_vocab = n_vocab
        self._cond = threading.Condition()
        self._waiting: deque[Entry] = deque()
        self._active: list[_Sequence] = []
        self._free = list(range(config.n_slots - 1, -1, -1))  # pop() gives the lowest id
        self._stopping = False
        self._hold = 1.0  # seconds a request holds a slot, moving average (for Retry-After)
        self._thread: threading.Thread | None = None
        self._ctx: Any = None
        self._batch: Any = None
        self.n_ctx_seq = config.n_ctx  # cells per sequence, as llama.cpp padded them (set at start)

    # ---- the caller's side (any thread) -------------------------------------------------------

    def start(self) -> None:
        """Create the context on the scheduler's thread; raises what creating it raised."""
        started: Future[None] = Future()
        previous = threading.stack_size(SLOT_STACK_BYTES)
        try:
            self._thread = threading.Thread(
                target=self._run, args=(started,), name="kvproxy-slots", daemon=True
            )
            self._thread.start()
        finally:
            threading.stack_size(previous)
        started.result()

    @property
    def busy(self) -> int:
        return self.config.n_slots - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def retry_after(self) -> int:
        """Seconds until the waiting requests and this one likely have a slot (1 to 60)."""
        estimate = self._hold * (len(self._waiting) + 1) / self.config.n_slots
        return max(1, min(RETRY_AFTER_MAX, math.ceil(estimate)))

    def submit(self, entry: Entry) -> None:
        """Queue a request for a slot; :class:`QueueFull` when ``max_queue`` requests already wait
        (a request that finds a free slot never counts as waiting)."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            free_now = len(self._free) - len(self._waiting)
            if free_now <= 0 and len(self._waiting) >= self.config.max_queue:
                raise QueueFull(
                    f"The server is busy: all {self.config.n_slots} slot(s) in use and "
                    f"{len(self._waiting)} request(s) waiting. Retry later.",
                    self.retry_after(),
                )
            self._waiting.append(entry)
            self._cond.notify()

    def withdraw(self, entry: Entry) -> bool:
        """Take a request out of the queue if it is still waiting (True); once it holds a slot,
        its cancel flag stops it at the next token."""
        with self._cond:
            try:
                self._waiting.remove(entry)
            except ValueError:
                return False
            return True

    def close(self) -> None:
        """Stop the thread: requests still waiting or running get an error; frees the context."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- the scheduler's thread -----------------------------------------------------------------

    def _make_context(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        c = self.config
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = c.n_ctx * c.n_slots  # llama.cpp gives each of n_seq_max streams n_ctx / n_seq_max
        params.n_batch = max(c.n_batch, c.n_slots)
        params.n_ubatch = max(c.n_ubatch, c.n_slots)
        params.n_seq_max = c.n_slots
        params.kv_unified = False
        params.n_outputs_max = c.n_slots  # at most one row per sequence per call
        params.n_threads = params.n_threads_batch = c.threads
        params.type_k, params.type_v = c.type_k, c.type_v
        on, off = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.flash_attn_type = on if c.flash_attn else off
        params.swa_full = False  # sliding-window layers keep their window only, as llama-server does
        params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=int(params.n_batch), embd=0, n_seq_max=1, verbose=False)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self._ctx.ctx))

    def _run(self, started: Future[None]) -> None:
        try:
            self._make_context()
        except BaseException as exc:  # handed to start()'s caller
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            while self._next_round():
                self._reap()
                if self._active:
                    self._step()
        finally:
            self._shut_down()

    def _next_round(self) -> bool:
        """Wait for work, give free slots to waiting requests; False once stopping."""
        with self._cond:
            while not self._stopping and not self._active and not self._waiting:
                self._cond.wait()
            if self._stopping:
                return False
            taken = []
            while self._waiting and self._free:
                taken.append((self._waiting.popleft(), self._free.pop()))
        now = time.monotonic()
        for entry, seq in taken:
            if entry.cancel.is_set():
                self._release_seq(seq)
                continue
            try:
                sampler = SamplerChain(
                    entry.request.sampling, self._n_vocab, entry.request.grammar, self._model.vocab
                )
            except (BackendError, MemoryError) as exc:  # the request fails, the slot stays free
                entry.output.fail(exc if isinstance(exc, BackendError) else BackendError(str(exc)))
                self._release_seq(seq)
                entry.on_admit()  # the waiter reads the failure now, not at its queue deadline
                continue
            self._active.append(_Sequence(entry, seq, sampler, admitted=now))
            entry.on_admit()
        return True

    def _release_seq(self, seq: int) -> None:
        self._ctx.kv_cache_seq_rm(seq, -1, -1)
        with self._cond:
            self._free.append(seq)
            self._free.sort(reverse=True)

    def _leave(self, s: _Sequence) -> None:
        """Free a sequence's slot, KV cells and sampler."""
        self._active.remove(s)
        s.sampler.close()
        self._release_seq(s.seq)
        held = time.monotonic() - s.admitted
        self._hold = 0.8 * self._hold + 0.2 * held

    def _reap(self) -> None:
        """Sequences whose client left stop here, before the next call."""
        for s in [s for s in self._active if s.entry.cancel.is_set()]:
            self._leave(s)

    def _step(self) -> None:
        """One llama_decode over every active sequence, then sampling for those with a row."""
        c = self.config
        rows: list[tuple[int, int, int, bool, _Sequence | None]] = []  # token, pos, seq, output, owner
        generating = [s for s in self._active if s.generating]
        for s in generating:
            if s.n_past >= self.n_ctx_seq:  # cannot happen through the API (prompts are checked)
                s.entry.output.end()
                self._leave(s)
                continue
            rows.append((s.next_token, s.n_past, s.seq, True, s))
        budget = max(c.n_batch, c.n_slots) - len(rows)
        if rows:
            budget = min(budget, c.prefill_chunk)
        for s in self._active:
            if s.generating or budget <= 0:
                continue
            prompt = s.prompt
            take = min(len(prompt) - s.n_past, budget)
            last = s.n_past + take == len(prompt)
            for k in range(s.n_past, s.n_past + take):
                rows.append((prompt[k], k, s.seq, last and k == len(prompt) - 1, s if last else None))
            budget -= take
        if not rows:
            return
        # llama.cpp splits a multi-stream batch into micro-batches of consecutive sequence ids:
        # order by sequence (stable, so each sequence's tokens stay in position order)
        rows.sort(key=lambda r: r[2])
        self._fill(rows)
        try:
            self._ctx.decode(self._batch)
        except Exception as exc:  # a llama.cpp failure ends every sequence of this call
            in_call = {r[2] for r in rows}
            log.exception("llama_decode failed for %d sequence(s)", len(in_call))
            for s in [s for s in self._active if s.seq in in_call]:
                s.entry.output.fail(BackendError(f"llama_decode failed: {exc}"))
                self._leave(s)
            return
        advanced = Counter(r[2] for r in rows)
        for s in self._active:
            s.n_past += advanced.get(s.seq, 0)
        for index, (_token, _pos, _seq, output, owner) in enumerate(rows):
            if not output or owner is None:
                continue
            if owner.entry.cancel.is_set():
                self._leave(owner)
                continue
            try:
                token = owner.sampler.sample(self._ctx.ctx, index)
            except BackendError as exc:  # a grammar that allows no token: this request ends
                owner.entry.output.fail(exc)
                self._leave(owner)
                continue
            owner.next_token = token
            capture = owner.entry.request.capture
            if capture is not None:  # a shadow-sampled request keeps the row it was served from
                capture.take(self._ctx.get_logits_ith(index))
            if owner.entry.output.push(token, self._row(index)):
                self._leave(owner)

    def _row(self, index: int) -> Callable[[], npt.NDArray[np.float32]]:
        def read() -> npt.NDArray[np.float32]:
            return np.ctypeslib.as_array(self._ctx.get_logits_ith(index), shape=(self._n_vocab,))

        return read

    def _fill(self, rows: list[tuple[int, int, int, bool, _Sequence | None]]) -> None:
        b = self._batch.batch
        b.n_tokens = len(rows)
        for k, (token, pos, seq, output, _owner) in enumerate(rows):
            b.token[k] = token
            b.pos[k] = pos
            b.seq_id[k][0] = seq
            b.n_seq_id[k] = 1
            b.logits[k] = output

    def _shut_down(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for entry in waiting:
            entry.output.fail(ShuttingDown("the server is shutting down"))
        for s in list(self._active):
            s.entry.output.fail(ShuttingDown("the server is shutting down"))
            s.sampler.close()
            self._active.remove(s)
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        self._batch = self._ctx = None
