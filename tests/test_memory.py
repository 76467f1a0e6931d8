"""KV byte accounting against hand-computed figures and ggml's block sizes."""

from __future__ import annotations

import pytest

from kvproxy.config import KVCacheType as T
from kvproxy.memory import (
    AttentionShape,
    bits_per_value,
    kv_bytes_per_token,
    kv_cache_bytes,
    row_bytes,
)

# Gemma 3 270M: 18 layers, 1 KV head of width 256, 512-token window on 15 of the 18 layers.
GEMMA3_270M = AttentionShape(
    n_layers=18,
    n_head_kv=1,
    head_dim_k=256,
    head_dim_v=256,
    sliding_window=512,
    swa_layers=frozenset(i for i in range(18) if i % 6 < 5),
)


@pytest.mark.parametrize(
    ("k", "v", "per_token"),
    [
        (T.F16, T.F16, 18 * (512 + 512)),
        (T.BF16, T.BF16, 18 * (512 + 512)),
        (T.Q8_0, T.Q8_0, 18 * (272 + 272)),  # 8 blocks of 34 bytes per 256-wide row
        (T.Q4_0, T.Q4_0, 18 * (144 + 144)),  # 8 blocks of 18 bytes
        (T.Q8_0, T.Q4_0, 18 * (272 + 144)),
        (T.Q5_1, T.Q5_0, 18 * (192 + 176)),
        (T.IQ4_NL, T.Q4_1, 18 * (144 + 160)),
    ],
)
def test_gemma3_270m_bytes_per_token(k: T, v: T, per_token: int) -> None:
    assert kv_bytes_per_token(GEMMA3_270M, k, v) == per_token


def test_sliding_window_layers_stop_growing_at_the_window() -> None:
    per_layer = 288  # q4_0 K + V, one 256-wide head
    assert kv_cache_bytes(GEMMA3_270M, T.Q4_0, T.Q4_0, 256) == 18 * 256 * per_layer
    assert kv_cache_bytes(GEMMA3_270M, T.Q4_0, T.Q4_0, 4096) == per_layer * (3 * 4096 + 15 * 512)


def test_bits_per_value() -> None:
    assert bits_per_value(T.F16) == 16
    assert bits_per_value(T.Q8_0) == 8.5
    assert bits_per_value(T.Q4_0) == bits_per_value(T.IQ4_NL) == 4.5


def test_rows_must_fill_whole_blocks() -> None:
    with pytest.raises(ValueError, match="whole q4_0 blocks"):
        row_bytes(T.Q4_0, 48)
    assert row_bytes(T.F16, 48) == 96
