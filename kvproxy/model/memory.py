"""KV-cache byte accounting: pure functions of a model's attention shape and the KV element types.

Only layers that hold KV count: a hybrid model's recurrent layers keep a fixed-size f32 state
instead (reported on its own, never in the KV saving), and layers that share an earlier layer's KV
(Gemma 3n, Gemma 4) keep none. Cells per stream follow llama.cpp's sizing of full and
sliding-window caches, per sequence or unified (:func:`kv_cells`).

The element sizes come from ggml's own block table (``gguf.constants.GGML_QUANT_SIZES``): a q4_0
block stores 32 values in 18 bytes, q8_0 32 values in 34 bytes, f16 one value in 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict, Unpack

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvproxy.config import KVCacheType


@dataclass(frozen=True)
class RecurrentShape:
    """The fixed-size state one recurrent layer keeps per sequence, in values (llama.cpp's
    ``n_embd_r``: the convolution state, and ``n_embd_s``: the SSM / delta-net state). llama.cpp
    stores both in f32 whatever ``-ctk/-ctv`` say (src/llama-model.cpp: ``GGML_TYPE_F32``)."""

    conv_values: int
    state_values: int

    @property
    def bytes_per_layer(self) -> int:
        return 4 * (self.conv_values + self.state_values)


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
    # KV heads per layer where the GGUF gives one count per layer (Gemma 4: fewer on full layers).
    layer_n_head_kv: tuple[int, ...] = ()
    # Head sizes of the sliding-window layers where they differ (Gemma 4: 256 against 512).
    head_dim_k_swa: int | None = None
    head_dim_v_swa: int | None = None
    # Layers that keep a recurrent state instead of KV (Qwen3.5/3.6: three of every four).
    recurrent_layers: frozenset[int] = frozenset()
    recurrent: RecurrentShape | None = None
    # Layers from this index on keep no KV of their own: they read an earlier layer's (Gemma 3n and
    # Gemma 4's shared_kv_layers).
    kv_layers_from_start: int | None = None

    def kv_layers(self) -> tuple[KVLayer, ...]:
        """The layers that hold KV, as llama.cpp allocates them (src/llama-kv-cache.cpp: layers
        without KV of their own and recurrent layers are skipped)."""
        out = []
        for il in range(self.n_layers):
            if il in self.recurrent_layers:
                continue
            if self.kv_layers_from_start is not None and il >= self.kv_layers_from_start:
                continue
            k, v = self._values(il)
            out.append(KVLayer(il, il in self.swa_layers, k, v))
        return tuple(out)

    def _values(self, il: int) -> tuple[int, int]:
        """K and V values one token takes in layer ``il`` (llama.cpp's n_embd_k_gqa / n_embd_v_gqa)."""
        heads = self.layer_n_head_kv[il] if self.layer_n_head_kv else self.n_head_kv
        swa = il in self.swa_layers
        dk = self.head_dim_k_swa if swa and self.head_dim_k_swa is not None else self.head_dim_k
        dv = self.head_dim_v_swa if swa and self.head_dim_v_swa is not None else self.head_dim_v
        return heads * dk, heads * dv

    @property
    def max_v_values(self) -> int:
        """The widest V row of any layer: without flash attention llama.cpp stores V transposed and
        pads every layer's V to this when they differ (src/llama-kv-cache.cpp, TAG_V_CACHE_VARIABLE)."""
        return max((self._values(il)[1] for il in range(self.n_layers)), default=0)

    def recurrent_bytes(self, n_seq: int = 1) -> int:
        """Bytes of the recurrent state: f32, one state per sequence (``max(1, n_seq_max)`` cells)."""
        if self.recurrent is None:
            return 0
        return len(self.recurrent_layers) * self.recurrent.bytes_per_layer * max(1, n_seq)


@dataclass(frozen=True)
class KVLayer:
    index: int
    swa: bool
    k_values: int  # per token: KV heads x K head size
    v_values: int


def ggml_type(cache_type: KVCacheType) -> GGMLQuantizationType:
    return GGMLQuantizationType[cache_type.name]


def row_bytes(cache_type: KVCacheType, n_elements: int) -> int:
    """Bytes ggml uses for one row of ``n_elements`` values of this type (whole blocks)."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(cache_type)]
    if n_elements % block_size:
        raise ValueError(f"{n_elements} values do not fill whole {cache_type} blocks of {block_size}")
    return n_elements // block_size * type_size


def check_head_sizes(
    shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType, *, flash_attn: bool = True
) -> None:
    """Raise ValueError where llama.cpp refuses the context (llama_init_from_model): with flash
    attention, every layer's K (V) head size must fill whole blocks of a quantized K (V) type."""
    if not flash_attn:
        return
    heads = (
        (type_k, {shape.head_dim_k, shape.head_dim_k_swa or shape.head_dim_k}),
        (type_v, {shape.head_dim_v, shape.head_dim_v_swa or shape.head_dim_v}),
    )
    for cache_type, sizes in heads:
        for size in sorted(sizes):
            row_bytes(cache_type, size)


def bits_per_value(cache_type: KVCacheType) -> float:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type(cache_type)]
    return 8.0 * type_size / block_size


def _layer_bytes(
    layer: KVLayer, type_k: KVCacheType, type_v: KVCacheType, v_values: int | None = None
) -> int:
    return row_bytes(type_k, layer.k_values) + row_bytes(
        type_v, layer.v_values if v_values is None else v_values
    )


def kv_bytes_per_token(shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType) -> int:
    """Bytes one more token costs while the context is within every layer's window."""
    return sum(_layer_bytes(layer, type_k, type_v) for layer in shape.kv_layers())


def kv_cache_bytes(shape: AttentionShape, type_k: KVCacheType, type_v: KVCacheType, n_tokens: int) -> int:
    """Bytes the KV cache needs to hold ``n_tokens`` tokens; sliding-window layers cap at the window."""
    swa_tokens = min(n_tokens, shape.sliding_window) if shape.sliding_window else n_tokens
    return sum(
        _layer_bytes(layer, type_k, type_v) * (swa_tokens if layer.swa else n_tokens)
        for layer in shape.kv_layers()
    )


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


class KVLayout(TypedDict, total=False):
    """How a llama.cpp context lays its KV cache out (:func:`kv_cells`); what is left out takes
    llama.cpp's library default: ``n_ubatch`` 512, one sequence, per-sequence streams, the
    sliding-window cache cut to the window, flash attention on (no V padding)."""

    n_ubatch: int
    n_seq: int
    kv_unified: bool
    swa_full: bool
    flash_attn: bool


@dataclass(frozen=True)
class KVCells:
    """Cells llama.cpp gives each stream, for full and for sliding-window layers, and how many
    streams there are (one unified stream, or one per sequence)."""

    full: int
    swa: int
    streams: int


def kv_cells(
    shape: AttentionShape,
    n_ctx: int,
    *,
    n_ubatch: int = 512,
    n_seq: int = 1,
    kv_unified: bool = False,
    swa_full: bool = False,
) -> KVCells:
    """As llama.cpp sizes its caches (src/llama-context.cpp, src/llama-kv-cache-iswa.cpp):

    * the context is padded to a multiple of 256; without a unified cache each of the ``n_seq``
      sequences gets its own stream of ``pad(n_ctx / n_seq, 256)`` cells (llama-server ``-np N``),
      with one, a single stream of ``pad(n_ctx)`` cells is shared (``--kv-unified``, and
      llama-server's default when ``-np`` is not given: 4 slots, unified);
    * sliding-window layers get ``pad(min(n_ctx_seq, n_swa x (n_seq if unified else 1) + n_ubatch),
      256)`` cells per stream (the window of every sequence sharing the stream, plus one
      micro-batch) unless ``swa_full``.
    """
    n_ctx_pad = _pad(n_ctx)
    n_ctx_seq = n_ctx_pad if kv_unified or n_seq <= 1 else _pad(n_ctx_pad // n_seq)
    streams = 1 if kv_unified else max(1, n_seq)
    if shape.swa_layers and shape.sliding_window and not swa_full:
        swa = _pad(min(n_ctx_seq, shape.sliding_window * (n_seq if kv_unified else 1) + n_ubatch))
    else:
        swa = n_ctx_seq
    return KVCells(n_ctx_seq, swa, streams)


def kv_cache_parts(
    shape: AttentionShape,
    type_k: KVCacheType,
    type_v: KVCacheType,
    n_ctx: int,
    *,
    n_ubatch: int = 512,
    n_seq: int = 1,
    kv_unified: bool = False,
    swa_full: bool = False,
    flash_attn: bool = True,
) -> tuple[int, int]:
    """Bytes of the full-attention cache and of the sliding-window cache (llama.cpp logs one line
    for each), cells as :func:`kv_cells` gives them; only layers that hold KV count
    (:meth:`AttentionShape.kv_layers`), and without flash attention V rows are padded to the widest
    layer's. A recurrent state is not KV: :meth:`AttentionShape.recurrent_bytes`."""
    cells = kv_cells(shape, n_ctx, n_ubatch=n_ubatch, n_seq=n_seq, kv_unified=kv_unified, swa_full=swa_full)
    v_pad = None if flash_attn else shape.max_v_values
    full = swa = 0
    for layer in shape.kv_layers():
        per_cell = _layer_bytes(layer, type_k, type_v, v_pad)
        if layer.swa:
            swa += per_cell * cells.swa * cells.streams
        else:
            full += per_cell * cells.full * cells.streams
    return full, swa


def kv_cache_allocated_bytes(
    shape: AttentionShape,
    type_k: KVCacheType,
    type_v: KVCacheType,
    n_ctx: int,
    **layout: Unpack[KVLayout],
) -> int:
    """Bytes llama.cpp allocates for the KV cache of a context of ``n_ctx`` tokens: both parts of
    :func:`kv_cache_parts`."""
    return sum(kv_cache_parts(shape, type_k, type_v, n_ctx, **layout))


KV_MEMORY_FIELDS = (
    "bytes_per_token",
    "f16_bytes_per_token",
    "n_ctx",
    "n_streams",
    "allocated_bytes",
    "f16_allocated_bytes",
    "saved_bytes",
    "saved_fraction",
    "recurrent_bytes",
)


def llama_n_ubatch(batch_size: int, n_ctx: int) -> int:
    """llama.cpp's micro-batch: its default 512, never above the batch (which is at most n_ctx)."""
    return min(batch_size, n_ctx, 512)


def kv_memory_summary(
    shape: AttentionShape,
    type_k: KVCacheType,
    type_v: KVCacheType,
    n_ctx: int,
    **layout: Unpack[KVLayout],
) -> dict[str, float | int]:
    """What one KV config costs and saves against f16, per token and as allocated for ``n_ctx``:
    the figures of the start-up banner, the status endpoint (and page) and the KV metrics, whose
    keys are :data:`KV_MEMORY_FIELDS`. The recurrent state (hybrid models) is reported beside the
    KV figures and kept out of the saving: ``-ctk/-ctv`` do not change it.

    ``n_ctx`` is the whole context, as llama.cpp is given it: without a unified cache each of the
    ``n_seq`` sequences (the embedded ``--parallel`` slots, llama-server's ``-np``) gets a stream of
    ``n_ctx / n_seq`` cells."""
    f16 = KVCacheType.F16
    n_seq = layout.get("n_seq", 1)
    at_ctx = kv_cache_allocated_bytes(shape, type_k, type_v, n_ctx, **layout)
    f16_at_ctx = kv_cache_allocated_bytes(shape, f16, f16, n_ctx, **layout)
    n_streams = 1 if layout.get("kv_unified", False) else max(1, n_seq)  # one per slot
    summary: dict[str, float | int] = {
        "bytes_per_token": kv_bytes_per_token(shape, type_k, type_v),
        "f16_bytes_per_token": kv_bytes_per_token(shape, f16, f16),
        "n_ctx": n_ctx // n_streams,  # cells asked for per stream (a slot's context)
        "n_streams": n_streams,
        "allocated_bytes": at_ctx,
        "f16_allocated_bytes": f16_at_ctx,
        "saved_bytes": f16_at_ctx - at_ctx,
        "saved_fraction": 1.0 - at_ctx / f16_at_ctx if f16_at_ctx else 0.0,
        "recurrent_bytes": shape.recurrent_bytes(n_seq),
    }
    assert tuple(summary) == KV_MEMORY_FIELDS
    return summary
