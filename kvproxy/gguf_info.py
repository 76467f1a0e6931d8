"""What kvproxy needs to know about a GGUF file, read from its key-value header.

This runs before llama.cpp loads the weights, so start-up can print the KV footprint and reject bad
settings early. ``gguf.GGUFReader`` parses every array element into numpy views, which takes about
10 s for Gemma's 262,144-entry tokenizer arrays on this machine; the reader here walks the same
header (with the ``gguf`` package's type codes) and skips large arrays, in about 0.1 s.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import GGUF_MAGIC, GGUFValueType

from kvproxy.memory import AttentionShape

# Architectures whose sliding-window layout llama.cpp hard-codes when the GGUF does not carry
# `<arch>.attention.sliding_window_pattern` (src/models/<arch>.cpp: load_swa_pattern(ml, N)):
# a layer il is sliding-window when il % N < N - 1.
_DEFAULT_SWA_PERIOD = {"gemma3": 6, "gemma2": 2, "cohere2": 4}


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    architecture: str
    context_length: int | None
    chat_template: str | None
    attention: AttentionShape


_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip
MAX_ARRAY = 4096  # arrays longer than this (tokenizer vocabularies) are skipped, not parsed


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if count <= MAX_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype == GGUFValueType.STRING:
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            elif etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            else:
                raise ValueError(f"unsupported array element type {etype.name}")
            return None
        return self.unpack(_SCALARS[vtype])


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF key-value header (little-endian GGUF v2/v3); large arrays map to None."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            if cur.unpack("<I") != GGUF_MAGIC:
                raise ValueError("bad magic number")
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version} (big-endian files are not read)")
            cur.unpack("<Q")  # tensor count
            n_kv = cur.unpack("<Q")
            out: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                out[key] = cur.value(GGUFValueType(cur.unpack("<I")))
            return out
        except (struct.error, ValueError, KeyError) as exc:
            raise ValueError(str(exc)) from exc


def _swa_layers(n_layers: int, pattern: Any, architecture: str) -> frozenset[int]:
    if isinstance(pattern, list):  # one flag per layer
        return frozenset(i for i, is_swa in enumerate(pattern[:n_layers]) if is_swa)
    period = int(pattern) if pattern is not None else _DEFAULT_SWA_PERIOD.get(architecture, 0)
    if period <= 0:  # llama.cpp: pattern 0 means every layer is sliding-window
        return frozenset(range(n_layers))
    return frozenset(i for i in range(n_layers) if i % period < period - 1)


def read_model_info(path: Path) -> ModelInfo:
    """Read name, architecture, chat template and KV shape; raises ValueError for a non-GGUF file."""
    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = str(meta.get("general.architecture") or "")
    if not arch:
        raise ValueError(f"{path} has no general.architecture key")

    def hp(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    def largest(value: Any) -> int:  # per-layer counts exist (e.g. OpenELM); take the largest
        if isinstance(value, list):
            value = max(value, default=0)
        return int(value) if isinstance(value, int | float) else 0

    kind = str(meta.get("general.type") or "model")
    n_layers, n_embd = largest(hp("block_count")), largest(hp("embedding_length"))
    if kind != "model" or n_layers <= 0 or n_embd <= 0:
        what = f"a {kind} file, not a model" if kind != "model" else "not a model (an mmproj or LoRA file?)"
        raise ValueError(
            f"{path} has no model hyper-parameters ({arch}.block_count, {arch}.embedding_length): {what}"
        )
    n_head = largest(hp("attention.head_count"))
    n_head_kv = hp("attention.head_count_kv")
    n_head_kv = largest(n_head_kv) if n_head_kv is not None else n_head
    head_dim_k, head_dim_v = largest(hp("attention.key_length")), largest(hp("attention.value_length"))
    if n_head <= 0 and not (head_dim_k and head_dim_v):
        raise ValueError(
            f"{path} has {arch}.attention.head_count {n_head} and no key/value lengths: its KV cache "
            "cannot be sized (a damaged or unsupported model file)"
        )
    head_dim_k = head_dim_k or n_embd // n_head
    head_dim_v = head_dim_v or n_embd // n_head
    window = hp("attention.sliding_window")
    window = int(window) if window else None
    swa = _swa_layers(n_layers, hp("attention.sliding_window_pattern"), arch) if window else frozenset()
    ctx = hp("context_length")
    template = meta.get("tokenizer.chat_template")
    return ModelInfo(
        path=path,
        name=str(meta.get("general.name") or path.stem),
        architecture=arch,
        context_length=int(ctx) if ctx is not None else None,
        chat_template=str(template) if template else None,
        attention=AttentionShape(
            n_layers=n_layers,
            n_head_kv=n_head_kv,
            head_dim_k=head_dim_k,
            head_dim_v=head_dim_v,
            sliding_window=window,
            swa_layers=swa,
        ),
    )
