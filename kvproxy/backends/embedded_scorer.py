"""Exact teacher-forced scoring in process: two llama.cpp contexts on the primary's loaded weights.

One context has the primary's KV configuration, one the reference's (f16 by default). Both are fed
the exact tokens the primary produced (prompt, then the completion), and at every completion
position the full-vocabulary KL(P_reference || Q_primary) is computed. The weights are loaded once
(the contexts share the primary's ``llama_model``).

Memory stays bounded whatever the vocabulary and sequence length: the prompt prefix is decoded
without logits, and the scored part in chunks of ``chunk`` positions. Per chunk, for vocabulary V,
the bound is 36 bytes per logit (:func:`scoring_chunk_bytes`): in each of the two contexts
llama.cpp's output tensor and output buffer (2 x 2 x 4 bytes) and one float32 copy of the
reference's rows (4), with 16 to spare. :func:`kvproxy.kld.exact_kld` no longer takes memory per
logit: its temporaries are four 1 MiB slabs per thread, 8 MiB in all, whatever the chunk. For Gemma
(V = 262,144) and the default chunk of 8 the bound is 72 MiB, independent of sequence length;
`benchmarks/kld_throughput.py` measured 62.6 MiB (chunk 8) and 235 MiB (chunk 32, bound 288), so
about 28 bytes a logit; at chunk 1 the fixed buffers (about 12 MiB of llama.cpp's, plus the slabs)
pass the 9 MiB bound. The two scoring contexts' KV caches come on top, fixed at creation (32 MiB
measured for n_ctx 1024).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.backends.worker import close_on
from kvproxy.kld import PositionScores, exact_kld, logprobs_at
from kvproxy.memory import ggml_type
from kvproxy.priority import lower_thread_priority
from kvproxy.shadow.job import ShadowJob


def scoring_chunk_bytes(chunk: int, n_vocab: int) -> int:
    """Upper bound of the extra bytes one scoring chunk needs (see the module docstring)."""
    return chunk * n_vocab * (2 * 2 * 4 + 4 + 4 * 4)


class EmbeddedScorer:
    """Not thread-safe: call ``score`` from one thread at a time (the shadow worker's)."""

    def __init__(
        self,
        model: Any,  # llama_cpp._internals.LlamaModel, already loaded
        *,
        primary: KVConfig,
        reference: KVConfig,
        n_ctx: int,
        threads: int,
        flash_attn: bool,
        chunk: int = 8,
        batch: int = 512,
    ) -> None:
        from llama_cpp import _internals

        self.primary_kv = primary
        self.reference_kv = reference
        self.n_ctx = n_ctx
        self.chunk = chunk
        self.batch_size = max(batch, chunk)
        self._model = model
        self.n_vocab = int(model.n_vocab())
        self._ctx_primary = self._context(_internals, primary, n_ctx, threads, flash_attn)
        self._ctx_reference = self._context(_internals, reference, n_ctx, threads, flash_attn)
        self._batch = _internals.LlamaBatch(n_tokens=self.batch_size, embd=0, n_seq_max=1, verbose=False)

    def _context(self, internals: Any, kv: KVConfig, n_ctx: int, threads: int, flash_attn: bool) -> Any:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.batch_size
        params.n_ubatch = self.batch_size
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = int(ggml_type(kv.cache_type_k))
        params.type_v = int(ggml_type(kv.cache_type_v))
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.swa_full = False
        params.no_perf = True
        return internals.LlamaContext(model=self._model, params=params, verbose=False)

    def close(self) -> None:
        for obj in (self._batch, self._ctx_primary, self._ctx_reference):
            obj.close()

    def _decode(self, ctx: Any, tokens: Sequence[int], n_past: int, with_logits: bool) -> None:
        self._batch.set_batch(batch=list(tokens), n_past=n_past, logits_all=with_logits)
        ctx.decode(self._batch)

    def _logits(self, ctx: Any, n_rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ctypeslib.as_array(ctx.get_logits(), shape=(n_rows, self.n_vocab))

    def score(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        check_ids: Sequence[Sequence[int]] | None = None,
    ) -> PositionScores:
        """Per-position exact scores for every completion token, teacher-forced on both configs.

        Position j scores ``completion[j]`` given ``prompt + completion[:j]``. With ``check_ids``
        (token ids per position), the primary config's logprobs of those tokens are returned too,
        in ``PositionScores.check_logprobs``.
        """
        if not prompt:
            raise ValueError("scoring needs at least one prompt token")
        if not completion:
            return PositionScores.concat([])
        seq = list(prompt) + list(completion[:-1])
        if len(seq) > self.n_ctx:
            raise ValueError(f"{len(seq)} tokens do not fit the scoring context of {self.n_ctx}")
        start = len(prompt) - 1  # the position whose logits predict completion[0]
        for ctx in (self._ctx_primary, self._ctx_reference):
            ctx.kv_cache_clear()
            for i in range(0, start, self.batch_size):
                part = seq[i : min(i + self.batch_size, start)]
                self._decode(ctx, part, i, with_logits=False)
        parts = []
        checks: list[list[float]] = []
        for c in range(start, len(seq), self.chunk):
            part = seq[c : c + self.chunk]
            self._decode(self._ctx_reference, part, c, with_logits=True)
            ref = self._logits(self._ctx_reference, len(part)).copy()
            self._decode(self._ctx_primary, part, c, with_logits=True)
            primary = self._logits(self._ctx_primary, len(part))
            targets = completion[c - start : c - start + len(part)]
            parts.append(exact_kld(ref, primary, targets))
            if check_ids is not None:
                for row, ids in zip(primary, check_ids[c - start : c - start + len(part)], strict=False):
                    checks.append(logprobs_at(row, ids))
        scores = PositionScores.concat(parts).at(len(prompt))
        return scores if check_ids is None else scores.with_checks(checks)


class ThreadedScorer:
    """The async face of :class:`EmbeddedScorer`: scoring runs on one low-priority worker thread."""

    def __init__(self, factory: Callable[[], EmbeddedScorer]) -> None:
        self._factory = factory
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kvproxy-shadow", initializer=lower_thread_priority
        )
        self._scorer: EmbeddedScorer | None = None

    async def start(self) -> EmbeddedScorer:
        """Create the scoring contexts now (on the worker thread), so start-up fails early."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._get)

    def _get(self) -> EmbeddedScorer:
        if self._scorer is None:
            self._scorer = self._factory()
        return self._scorer

    async def score(self, job: ShadowJob) -> PositionScores:
        return await self.score_tokens(job.prompt_tokens, job.token_ids)

    async def score_tokens(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        check_ids: Sequence[Sequence[int]] | None = None,
    ) -> PositionScores:
        def run() -> PositionScores:
            return self._get().score(prompt, completion, check_ids)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        def free() -> None:
            if self._scorer is not None:
                self._scorer.close()
                self._scorer = None

        close_on(self._executor, free)
