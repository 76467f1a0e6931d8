"""The llama.cpp contexts scoring decodes in: one recipe for the scorer's and the what-if's.

Every scoring context shares the served model's weights (``llama_model``) and differs only in its
KV types and sizes; ``n_outputs_max`` caps the rows llama.cpp reserves for outputs (by default it
reserves n_batch rows, which for Gemma made a compute buffer of 514.5 MiB instead of 19.8 MiB).
"""

from __future__ import annotations

from typing import Any

from kvproxy.backends.base import KVConfig
from kvproxy.model.memory import ggml_type


def scoring_context(
    model: Any,
    kv: KVConfig,
    *,
    n_ctx: int,
    n_batch: int,
    n_ubatch: int,
    n_outputs_max: int,
    threads: int,
    flash_attn: bool,
    n_seq_max: int = 1,
) -> Any:
    """A ``llama_cpp._internals.LlamaContext`` on ``model`` with the KV config ``kv``; with several
    sequences each has its own stream of ``n_ctx`` cells (as llama-server without ``--kv-unified``)."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx * n_seq_max
    params.n_batch = n_batch
    params.n_ubatch = n_ubatch
    params.n_seq_max = n_seq_max
    params.kv_unified = False
    params.n_outputs_max = n_outputs_max
    params.n_threads = threads
    params.n_threads_batch = threads
    params.type_k = int(ggml_type(kv.cache_type_k))
    params.type_v = int(ggml_type(kv.cache_type_v))
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.swa_full = False
    params.no_perf = True
    return _internals.LlamaContext(model=model, params=params, verbose=False)


def memory_kind(model: Any) -> str:
    """What a model keeps of a prompt, as llama-server's context checkpoints see it: ``"swa"`` (some
    layers keep only a sliding window, kvproxy keeps them windowed), ``"recurrent"`` (recurrent
    state, alone or beside attention) or ``"full"`` (every layer keeps every token). llama-server
    cuts prompts for checkpoints on all but ``"full"`` (kvproxy.scoring.prompt_fill)."""
    import llama_cpp

    if llama_cpp.llama_model_is_recurrent(model.model) or llama_cpp.llama_model_is_hybrid(model.model):
        return "recurrent"
    return "swa" if llama_cpp.llama_model_n_swa(model.model) > 0 else "full"
