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

from kvproxy.model.memory import AttentionShape, RecurrentShape

# Architectures whose sliding-window layout llama.cpp hard-codes when the GGUF does not carry
# `<arch>.attention.sliding_window_pattern` (src/models/<arch>.cpp: load_swa_pattern(ml, N)):
# a layer il is sliding-window when il % N < N - 1.
_DEFAULT_SWA_PERIOD = {"gemma3": 6, "gemma2": 2, "cohere2": 4}

# llama.cpp's recurrent and hybrid architectures (src/llama-arch.cpp: llm_arch_is_recurrent,
# llm_arch_is_hybrid) and how each marks its recurrent layers (src/models/<arch>.cpp).
_RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# `<arch>.attention.recurrent_layers` if present, else one attention layer every
# `<arch>.full_attention_interval` layers (default 4): Qwen3-Next, Qwen3.5/3.6, MiniMax-01
_INTERVAL_HYBRIDS = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"})
# a layer without KV heads is recurrent
_HEADLESS_HYBRIDS = frozenset(
    {"jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "kimi-linear", "bailingmoe3", "kimi-k3"}
)
# Gemma 4: the last `<arch>.attention.shared_kv_layers` layers read an earlier layer's KV; Gemma 3n:
# every layer from the 20th (hard-coded in src/models/gemma3n.cpp)


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


def _per_layer(value: Any, n_layers: int) -> list[int] | None:
    """A per-layer array as ints, or None for a scalar (or a missing key)."""
    if isinstance(value, list):
        return [int(x) for x in value[:n_layers]]
    return None


def _recurrent_layers(meta: dict[str, Any], arch: str, n_layers: int, heads_kv: list[int] | None) -> set[int]:
    flags = _per_layer(meta.get(f"{arch}.attention.recurrent_layers"), n_layers)
    if arch in _RECURRENT_ARCHS:
        return set(range(n_layers))
    if arch in _INTERVAL_HYBRIDS:
        if flags is not None:
            return {i for i, f in enumerate(flags) if f}
        interval = int(meta.get(f"{arch}.full_attention_interval") or 4)
        return {i for i in range(n_layers) if (i + 1) % interval != 0}
    if arch in _HEADLESS_HYBRIDS and heads_kv is not None:
        return {i for i, h in enumerate(heads_kv) if h == 0}
    return set()


def _recurrent_shape(meta: dict[str, Any], arch: str, n_embd: int, n_head: int) -> RecurrentShape:
    """llama.cpp's ``n_embd_r`` and ``n_embd_s`` (src/llama-hparams.cpp) for the families it has:
    RWKV (wkv heads), LFM2 (short convolutions), Kimi's KDA and the Mamba / gated delta-net state
    (Qwen3.5/3.6, Jamba, ...)."""

    def hp(name: str) -> int:
        return int(meta.get(f"{arch}.{name}") or 0)

    d_conv, d_inner, d_state, n_group = (
        hp("ssm.conv_kernel"),
        hp("ssm.inner_size"),
        hp("ssm.state_size"),
        hp("ssm.group_count"),
    )
    if hp("wkv.head_size"):
        return RecurrentShape(hp("token_shift_count") * n_embd, n_embd * hp("wkv.head_size"))
    if hp("shortconv.l_cache"):
        return RecurrentShape(n_embd * (hp("shortconv.l_cache") - 1), d_state * d_inner)
    if hp("kda.head_dim"):
        kda = hp("kda.head_dim")
        return RecurrentShape(3 * (d_conv - 1 if d_conv else 3) * n_head * kda, kda * kda * n_head)
    conv = (d_conv - 1 if d_conv else 0) * (d_inner + 2 * n_group * d_state)
    return RecurrentShape(conv, d_state * d_inner)


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
    n_head = hp("attention.head_count")
    n_head_kv = hp("attention.head_count_kv")
    # llama.cpp: head_count_kv defaults to head_count, either may be one count per layer
    heads_kv = _per_layer(n_head_kv if n_head_kv is not None else n_head, n_layers)
    if heads_kv is not None:
        n_head_kv = max(heads_kv)
    n_head_kv = largest(n_head_kv if n_head_kv is not None else n_head)
    first_head = largest(n_head[0] if isinstance(n_head, list) and n_head else n_head)  # llama.cpp's n_head()
    head_dim_k, head_dim_v = largest(hp("attention.key_length")), largest(hp("attention.value_length"))
    if largest(n_head) <= 0 and not (head_dim_k and head_dim_v):
        raise ValueError(
            f"{path} has {arch}.attention.head_count {largest(n_head)} and no key/value lengths: its KV "
            "cache cannot be sized (a damaged or unsupported model file)"
        )
    default_head_dim = n_embd // first_head if first_head else 0
    head_dim_k = head_dim_k or default_head_dim
    head_dim_v = head_dim_v or default_head_dim
    window = hp("attention.sliding_window")
    window = int(window) if window else None
    swa = _swa_layers(n_layers, hp("attention.sliding_window_pattern"), arch) if window else frozenset()
    recurrent = _recurrent_layers(meta, arch, n_layers, heads_kv)
    kv_from: int | None = None
    if arch == "gemma4" and hp("attention.shared_kv_layers"):
        kv_from = n_layers - int(hp("attention.shared_kv_layers"))
    elif arch == "gemma3n":
        kv_from = 20
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
            layer_n_head_kv=tuple(heads_kv) if heads_kv is not None else (),
            head_dim_k_swa=int(hp("attention.key_length_swa") or head_dim_k) if swa else None,
            head_dim_v_swa=int(hp("attention.value_length_swa") or head_dim_v) if swa else None,
            recurrent_layers=frozenset(recurrent),
            recurrent=_recurrent_shape(meta, arch, n_embd, first_head) if recurrent else None,
            kv_layers_from_start=kv_from,
        ),
    )
