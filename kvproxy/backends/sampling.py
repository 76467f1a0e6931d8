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
"""

from __future__ import annotations

from typing import Any

from kvproxy.backends.base import SamplingParams

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: the dist sampler draws a random seed
PENALTY_LAST_N = 64  # llama-cpp-python's Llama(last_n_tokens_size=64), which Llama.generate used


class SamplerChain:
    """A llama.cpp sampler chain owned by one request; :meth:`close` frees it (idempotent)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise MemoryError("llama.cpp could not make a sampler chain")
        self._chain: Any = chain
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
        return int(self._lib.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:  # a safety net only: the scheduler closes every chain it makes
        self.close()
