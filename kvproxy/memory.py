"""KV-cache byte accounting: pure functions of a model's attention shape and the KV element types.

The element sizes come from ggml's own block table (``gguf.constants.GGML_QUANT_SIZES``): a q4_0
block stores 32 values in 18 bytes, q8_0 32 values in 34 bytes, f16 one value in 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvproxy.config import KVCacheType


@dataclass(frozen=True)
class AttentionShape:
    """What the KV cache of one model holds per token, per layer (read from GGUF metadata)."""

    n_layers: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    sliding_window: int | None = None
    # Indices of layers that use sliding-window attention (they keep at most `sliding_window`
    # tokens); every other layer keeps the whole context.
    swa_layers: frozenset[int] = frozenset()


def ggml_type(cache_type: KVCacheType) -> GGMLQuantizationType:
    return GGMLQuantizationType[cache_type.name]


def row_bytes(cache_type: KVCacheType, n_elements: int) -> int:
    """Bytes ggml uses for one row of ``n_elements`` values of this type (whole blocks)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(cache_type)]
    if n_elements % block_size:
        raise ValueError(f"{n_elements} values do not fill whole {cache_type} blocks of {block_size}")
    return n_elements // block_size * type_size


def bits_per_value(cache_type: KVCacheType) -> float:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(cache_type)]
    return 8.0 * type_size / block_size


def layer_bytes_per_token(shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType) -> int:
    """K plus V bytes one layer stores for one token."""
    return shape.n_head_kv * (row_bytes(type_k, shape.head_dim_k) + row_bytes(type_v, shape.head_dim_v))


def kv_bytes_per_token(shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType) -> int:
    """Bytes one more token costs while the context is within every layer's window."""
    return shape.n_layers * layer_bytes_per_token(shape, type_k, type_v)


def kv_cache_bytes(shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType, n_tokens: int) -> int:
    """Bytes the KV cache needs to hold ``n_tokens`` tokens; sliding-window layers cap at the window."""
    per_layer = layer_bytes_per_token(shape, type_k, type_v)
    n_swa = len(shape.swa_layers)
    swa_tokens = min(n_tokens, shape.sliding_window) if shape.sliding_window else n_tokens
    return per_layer * ((shape.n_layers - n_swa) * n_tokens + n_swa * swa_tokens)


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def kv_cache_allocated_bytes(
    shape: AttentionShape,
    type_k: KVCacheType,
    type_v: KVCacheType,
    n_ctx: int,
    *,
    n_ubatch: int = 512,
    n_seq: int = 1,
    swa_full: bool = False,
) -> int:
    """Bytes llama.cpp allocates for the KV cache of a context of ``n_ctx`` tokens.

    As llama.cpp sizes it (src/llama-context.cpp, src/llama-kv-cache-iswa.cpp): the context is
    padded to a multiple of 256 cells; sliding-window layers get ``pad(min(n_ctx, n_swa * n_seq +
    n_ubatch), 256)`` cells (room for the window plus one micro-batch) unless ``swa_full``.
    """
    per_layer = layer_bytes_per_token(shape, type_k, type_v)
    cells = _pad(n_ctx)
    n_swa = len(shape.swa_layers)
    if n_swa and shape.sliding_window and not swa_full:
        swa_cells = _pad(min(cells, shape.sliding_window * n_seq + n_ubatch))
    else:
        swa_cells = cells
    return per_layer * ((shape.n_layers - n_swa) * cells + n_swa * swa_cells)


KV_MEMORY_FIELDS = (
    "bytes_per_token",
    "f16_bytes_per_token",
    "n_ctx",
    "n_streams",
    "allocated_bytes",
    "f16_allocated_bytes",
    "saved_bytes",
    "saved_fraction",
)


def llama_n_ubatch(batch_size: int, n_ctx: int) -> int:
    """llama.cpp's micro-batch: its default 512, never above the batch (which is at most n_ctx)."""
    return min(batch_size, n_ctx, 512)


def kv_memory_summary(
    shape: AttentionShape,
    type_k: KVCacheType,
    type_v: KVCacheType,
    n_ctx: int,
    *,
    n_ubatch: int = 512,
    n_streams: int = 1,
) -> dict[str, float | int]:
    """What one KV config costs and saves against f16, per token and as allocated for ``n_ctx``:
    the figures of the start-up banner, the status endpoint (and page) and the KV metrics, whose
    keys are :data:`KV_MEMORY_FIELDS`.

    ``n_streams``: separate KV streams of ``n_ctx`` cells each, as the embedded server's
    ``--parallel`` slots have them (a context with ``n_seq_max`` streams and ``kv_unified`` off gives
    every stream the cells, sliding-window cache included, of a one-sequence context of ``n_ctx``)."""
    f16 = KVCacheType.F16
    at_ctx = n_streams * kv_cache_allocated_bytes(shape, type_k, type_v, n_ctx, n_ubatch=n_ubatch)
    f16_at_ctx = n_streams * kv_cache_allocated_bytes(shape, f16, f16, n_ctx, n_ubatch=n_ubatch)
    summary: dict[str, float | int] = {
        "bytes_per_token": kv_bytes_per_token(shape, type_k, type_v),
        "f16_bytes_per_token": kv_bytes_per_token(shape, f16, f16),
        "n_ctx": n_ctx,
        "n_streams": n_streams,
        "allocated_bytes": at_ctx,
        "f16_allocated_bytes": f16_at_ctx,
        "saved_bytes": f16_at_ctx - at_ctx,
        "saved_fraction": 1.0 - at_ctx / f16_at_ctx,
    }
    assert tuple(summary) == KV_MEMORY_FIELDS
    return summary
