"""GGUF metadata: the bundled Gemma, a second architecture written with gguf's own writer, junk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from kvproxy.model.gguf_info import read_model_info


def test_bundled_gemma(gemma_path: Path) -> None:
    info = read_model_info(gemma_path)
    assert info.name == "Gemma 3 270m" and info.architecture == "gemma3"
    assert info.context_length == 32768 and info.chat_template is None
    a = info.attention
    assert (a.n_layers, a.n_head_kv, a.head_dim_k, a.head_dim_v) == (18, 1, 256, 256)
    assert a.sliding_window == 512
    assert sorted(set(range(18)) - a.swa_layers) == [5, 11, 17]  # llama.cpp's gemma3 pattern


def test_llama_style_gqa_without_head_lengths(tmp_path: Path) -> None:
    path = tmp_path / "tiny-llama.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(4)
    writer.add_embedding_length(512)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_context_length(2048)
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((8, 512), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_model_info(path)
    assert info.name == "tiny llama" and info.architecture == "llama"
    assert info.chat_template == "{{ messages }}"
    a = info.attention
    assert (a.n_layers, a.n_head_kv, a.head_dim_k, a.head_dim_v) == (4, 2, 64, 64)
    assert a.sliding_window is None and a.swa_layers == frozenset()


def test_not_a_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_model_info(junk)


def test_fast_header_reader_agrees_with_gguf_reader(gemma_path: Path) -> None:
    """The reference library reads the same header (slowly: it parses the 262k-token arrays)."""
    from gguf import GGUFReader

    from kvproxy.model.gguf_info import MAX_ARRAY, read_metadata

    fast = read_metadata(gemma_path)
    reader = GGUFReader(gemma_path)
    assert set(fast) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in fast.items():
        expected = reader.fields[key].contents()
        if value is None:
            assert isinstance(expected, list) and len(expected) > MAX_ARRAY
        else:
            assert value == pytest.approx(expected) if isinstance(value, float) else value == expected


def write_bad_gguf(path: Path, arch: str, kind: str | None = None, **hparams: int) -> Path:
    """A GGUF with only the keys given (``block_count=4`` writes ``<arch>.block_count``)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_name("bad")
    if kind is not None:
        writer.add_type(kind)
    for key, value in hparams.items():
        writer.add_uint32(f"{arch}.{key.replace('__', '.')}", value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_ggufs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Issue 20, finding 8: files that read as GGUF but are not models kvproxy can size; each with
    the reason start-up must give (they were TypeError and ZeroDivisionError tracebacks)."""
    return {
        "mmproj": (write_bad_gguf(tmp_path / "mmproj.gguf", "clip", "mmproj"), "a mmproj file, not a model"),
        "lora": (write_bad_gguf(tmp_path / "lora.gguf", "llama", "adapter"), "a adapter file, not a model"),
        "no hyper-parameters": (write_bad_gguf(tmp_path / "bare.gguf", "llama"), "no model hyper-parameters"),
        "head_count 0": (
            write_bad_gguf(
                tmp_path / "zero.gguf", "llama", block_count=4, embedding_length=64, attention__head_count=0
            ),
            "head_count 0",
        ),
    }


def test_files_without_model_hyper_parameters_are_refused_with_a_reason(tmp_path: Path) -> None:
    for path, reason in bad_ggufs(tmp_path).values():
        with pytest.raises(ValueError, match=reason):
            read_model_info(path)
    # head_count 0 with explicit key/value lengths still sizes the cache (no division)
    ok = write_bad_gguf(
        tmp_path / "lengths.gguf",
        "llama",
        block_count=2,
        embedding_length=64,
        attention__head_count=0,
        attention__head_count_kv=1,
        attention__key_length=32,
        attention__value_length=32,
    )
    a = read_model_info(ok).attention
    assert (a.n_layers, a.n_head_kv, a.head_dim_k, a.head_dim_v) == (2, 1, 32, 32)
