"""KV byte accounting against hand-computed figures and ggml's block sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvproxy.config import KVCacheType as T
from kvproxy.model.memory import (
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


LLAMA_CPP_CHILD = r"""
import sys, llama_cpp
path, n_ctx, type_k, type_v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=512, type_k=type_k, type_v=type_v, flash_attn=True, swa_full=False,
                verbose=True)
"""


def llama_cpp_reported_kv_bytes(path: Path, n_ctx: int, k: T, v: T) -> float:
    """What llama.cpp logs when it creates the context: 'llama_kv_cache: size = X MiB (...)' per cache."""
    import re
    import subprocess
    import sys

    from kvproxy.model.memory import ggml_type

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LLAMA_CPP_CHILD,
            str(path),
            str(n_ctx),
            str(int(ggml_type(k))),
            str(int(ggml_type(v))),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    sizes = re.findall(r"llama_kv_cache: size =\s+([0-9.]+) MiB", out.stderr + out.stdout)
    assert sizes, out.stderr[-2000:]
    return sum(float(s) for s in sizes) * 2**20


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_gguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.mark.parametrize("types", [(T.F16, T.F16), (T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q8_0, T.Q4_0)])
@pytest.mark.parametrize("model", ["gemma", "tiny-llama"])
def test_kv_bytes_match_what_llama_cpp_allocates(
    model: str, types: tuple[T, T], gemma_path: Path, tiny_llama: Path
) -> None:
    from kvproxy.model.gguf_info import read_model_info
    from kvproxy.model.memory import kv_cache_allocated_bytes

    path = gemma_path if model == "gemma" else tiny_llama
    info = read_model_info(path)
    n_ctx = 16000  # not a multiple of 256: llama.cpp pads it
    mine = kv_cache_allocated_bytes(info.attention, *types, n_ctx)
    reported = llama_cpp_reported_kv_bytes(path, n_ctx, *types)
    assert mine == pytest.approx(reported, rel=0.01)


def test_tiny_llama_shape(tiny_llama: Path) -> None:
    from kvproxy.model.gguf_info import read_model_info

    a = read_model_info(tiny_llama).attention
    assert (a.n_layers, a.n_head_kv, a.head_dim_k, a.head_dim_v, a.swa_layers) == (4, 2, 32, 32, frozenset())
