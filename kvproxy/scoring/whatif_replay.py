"""The what-if replay: the served tokens under several candidate KV configs, against one reference.

One llama.cpp context per candidate plus one for the reference (f16 by default), all on the served
model's loaded ``llama_model`` (weights shared, so is their offload). Every context is fed the same
tokens on the decode path, as generation fed them and as ``kvproxy calibrate --score-path decode``
does: the prompt in calls of ``batch`` tokens (or the micro-batches of a llama-server's cuts,
``fill``), logits for its last token only, then ``completion[:-1]`` one token per ``llama_decode``.

At each step the reference's row is read once and the candidates' rows are stacked under it: one
:func:`kvproxy.kld.exact_kld` call scores every candidate against that row (the reference is
broadcast, not copied), so the per-position figures are those the shadow scorer computes for one
config (llama-perplexity's definitions). Extra memory: ``C`` candidate rows copied a step
(``C x n_vocab x 4`` bytes: 1 MiB a candidate for Gemma), the KLD's fixed temporaries, and each
context's KV cache of ``n_ctx`` cells (:func:`kvproxy.model.memory.kv_cache_allocated_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.kld import PositionScores, exact_kld
from kvproxy.model.memory import llama_n_ubatch
from kvproxy.scoring.contexts import memory_kind, scoring_context
from kvproxy.scoring.prompt_fill import PromptFill


class WhatIfReplay:
    """Not thread-safe: one caller at a time (the what-if worker thread)."""

    def __init__(
        self,
        model: Any,  # llama_cpp._internals.LlamaModel, already loaded
        *,
        candidates: Sequence[KVConfig],
        reference: KVConfig,
        n_ctx: int,
        threads: int,
        flash_attn: bool,
        batch: int = 512,
        ubatch: int | None = None,
    ) -> None:
        from llama_cpp import _internals

        if not candidates:
            raise ValueError("a what-if replay needs at least one candidate KV config")
        self.candidates = list(candidates)
        self.reference = reference
        self.n_ctx = n_ctx
        self.batch = min(batch, n_ctx)
        self.ubatch = ubatch if ubatch is not None else llama_n_ubatch(self.batch, n_ctx)
        self.n_vocab = int(model.n_vocab())
        # llama-server's checkpoint cuts apply to windowed or recurrent models (kvproxy.scoring.prompt_fill)
        self.cuts_apply = memory_kind(model) != "full"
        self._contexts: list[Any] = []
        self._batch: Any = None
        try:
            for kv in [reference, *self.candidates]:
                self._contexts.append(self._context(model, kv, threads, flash_attn))
            self._batch = _internals.LlamaBatch(n_tokens=self.batch, embd=0, n_seq_max=1, verbose=False)
        except Exception:
            self.close()
            raise

    def _context(self, model: Any, kv: KVConfig, threads: int, flash_attn: bool) -> Any:
        return scoring_context(
            model,
            kv,
            n_ctx=self.n_ctx,
            n_batch=self.batch,
            n_ubatch=self.ubatch,
            n_outputs_max=1,  # one row a call: llama.cpp's default reserves n_batch rows
            threads=threads,
            flash_attn=flash_attn,
        )

    def close(self) -> None:
        for ctx in self._contexts:
            ctx.close()
        self._contexts = []
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def _fill(self, tokens: Sequence[int], start: int, with_last_logits: bool) -> None:
        b = self._batch.batch
        n = len(tokens)
        b.n_tokens = n
        for k in range(n):
            b.token[k] = tokens[k]
            b.pos[k] = start + k
            b.seq_id[k][0] = 0
            b.n_seq_id[k] = 1
            b.logits[k] = with_last_logits and k == n - 1

    def _row(self, ctx: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def score(
        self, prompt: Sequence[int], completion: Sequence[int], fill: PromptFill | None = None
    ) -> list[PositionScores]:
        """Per candidate (in order), the per-position scores of ``completion`` after ``prompt``."""
        if not prompt:
            raise ValueError("scoring needs at least one prompt token")
        n = len(prompt) + max(len(completion) - 1, 0)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit the what-if context of {self.n_ctx}")
        if fill is not None and fill.ubatch > self.batch:
            raise ValueError(
                f"a prompt fill of micro-batches of {fill.ubatch} exceeds the batch {self.batch}"
            )
        if not completion:
            return [PositionScores.concat([]).at(len(prompt)) for _ in self.candidates]
        if fill is None:
            pieces = [(i, min(i + self.batch, len(prompt))) for i in range(0, len(prompt), self.batch)]
        else:
            pieces = fill.pieces(len(prompt), cuts_apply=self.cuts_apply)
        for ctx in self._contexts:
            ctx.kv_cache_clear()
            for start, end in pieces:
                self._fill(prompt[start:end], start, end >= len(prompt))
                ctx.decode(self._batch)
        rows: list[list[PositionScores]] = [[] for _ in self.candidates]
        for step in range(len(completion)):
            if step:
                pos = len(prompt) + step - 1
                for ctx in self._contexts:
                    self._fill([completion[step - 1]], pos, True)
                    ctx.decode(self._batch)
            s = self._step(completion[step])
            for k, out in enumerate(rows):
                out.append(s[k])
        for ctx in self._contexts:
            ctx.kv_cache_clear()
        return [PositionScores.concat(r).at(len(prompt)) for r in rows]

    def _step(self, target: int) -> list[PositionScores]:
        """Every candidate's row of this step against the reference's, in one KLD call."""
        ref = self._row(self._contexts[0])
        rows = np.stack([self._row(ctx) for ctx in self._contexts[1:]])
        s = exact_kld(np.broadcast_to(ref, rows.shape), rows, [target] * len(rows))
        return [
            PositionScores(
                s.kld[k : k + 1], s.same_top[k : k + 1], s.p_ref[k : k + 1], s.p_primary[k : k + 1]
            )
            for k in range(len(rows))
        ]
