"""One request's llama.cpp sampler chain, built from its sampling parameters and freed when it ends.

llama.cpp's chain keeps a candidate buffer of one entry per vocabulary token (12 bytes each: 3 MiB for
Gemma's 262,144 tokens) for as long as the chain lives. llama-cpp-python's ``LlamaSampler`` frees its
chain only when the object is collected, and the object sits in a reference cycle (its ExitStack's
callback holds ``self``), so ``Llama.generate``, which replaces its sampler on every call, left each
request's buffer to the next full garbage collection: under concurrency the heap grew by 3 MiB a
request and glibc kept the pages (issue 20). kvproxy therefore calls llama.cpp's C sampler API
directly: a chain is made when a request takes a slot and ``llama_sampler_free`` runs when it leaves,
so at most one chain per slot exists. No patch to llama-cpp-python is needed.

The chain is the one ``Llama.generate`` built (same samplers, same order, same parameters), so a seeded
or greedy request samples the same tokens as before: repetition penalties over the last 64 tokens,
then greedy at temperature 0, else top-k, typical (off), top-p, min-p, temperature and a seeded draw.

A JSON response format adds a grammar, applied as llama.cpp's own ``common_sampler`` applies it: the
chain picks from the raw logits, the grammar checks that one token, and only when it refuses it is
the grammar applied to the whole vocabulary and the pick made again (a grammar inside the chain
checks all of Gemma's 262,144 tokens every step: about a second a token on 2 cores). The logits are
never changed, so logprobs, and the shadow path that replays without the grammar, see the raw
distribution.

A grammar may refuse every token (a pattern only a NUL byte completes: no token holds one). llama.cpp's
sampler then picks among tokens that are all refused and the grammar throws on accepting the pick,
a C++ exception that crosses ctypes and aborts the process. So the refused-pick path checks that the
grammar left a candidate, and ends the request with :class:`GrammarDeadEnd` when none is left, as
llama-server answers it (a 500) and serves on. The schema checks (kvproxy.schema_limits) refuse the
patterns known to do this before they get here.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from kvproxy.backends.base import BackendError, SamplingParams


class GrammarDeadEnd(BackendError):
    """The grammar refuses every token of the vocabulary: the output cannot go on."""


RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: the dist sampler draws a random seed
PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64), which Llama.generate used


class SamplerChain:
    """A llama.cpp sampler chain owned by one request; :meth:`close` frees it (idempotent)."""

    def __init__(
        self, params: SamplingParams, n_vocab: int, grammar: str | None = None, vocab: Any = None
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._chain: Any = None  # set last: close() (and __del__) may run after a failure here
        self._n_vocab = n_vocab
        self._grammar: Any = None
        self._candidates: Any = None
        if grammar is not None:
            from llama_cpp._internals import LlamaTokenDataArray

            self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not self._grammar:
                raise BackendError("the grammar did not parse")
            self._candidates = LlamaTokenDataArray(n_vocab=n_vocab)
            self._one = (llama_cpp.llama_token_data * 1)()
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            self.close()
            raise MemoryError("llama.cpp could not make a sampler chain")
        self._chain = chain
        seed = params.seed & 0xFFFFFFFF if params.seed is not None else RANDOM_SEED
        add = self._add
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
        if params.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: Any) -> None:
        self._lib.llama_sampler_chain_add(self._chain, sampler)  # the chain owns it from here

    def sample(self, ctx: Any, index: int) -> int:
        """Sample from the logits of batch position ``index`` of the context's last decode, and
        accept the token (the penalties remember it)."""
        if self._chain is None:
            raise RuntimeError("sampler chain already freed")
        if self._grammar is None:
            return int(self._lib.llama_sampler_sample(self._chain, ctx, index))
        return self._sample_constrained(ctx, index)

    def _sample_constrained(self, ctx: Any, index: int) -> int:
        lib, candidates = self._lib, self._candidates
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        full = ctypes.byref(candidates.candidates)
        candidates.copy_logits(logits)
        lib.llama_sampler_apply(self._chain, full)
        token = int(candidates.candidates_data.id[candidates.candidates.selected])
        self._one[0] = lib.llama_token_data(token, 1.0, 0.0)
        one = lib.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        lib.llama_sampler_apply(self._grammar, ctypes.byref(one))
        if not np.isfinite(self._one[0].logit):  # refused: constrain the whole vocabulary
            candidates.copy_logits(logits)
            lib.llama_sampler_apply(self._grammar, full)
            if not np.isfinite(candidates.candidates_data.logit).any():  # llama.cpp would abort
                raise GrammarDeadEnd(
                    "the response format's grammar allows no token here: no output can satisfy it"
                )
            lib.llama_sampler_apply(self._chain, full)
            token = int(candidates.candidates_data.id[candidates.candidates.selected])
        lib.llama_sampler_accept(self._grammar, token)
        lib.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
        self._candidates = None

    def __del__(self) -> None:  # a safety net only: the scheduler closes every chain it makes
        self.close()
