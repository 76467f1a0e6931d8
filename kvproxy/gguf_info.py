"""What kvproxy needs to know about a GGUF file, read from its metadata with the ``gguf`` package.

Reading the header is cheap (the file is memory-mapped, tensors are not touched), so this runs before
llama.cpp loads the weights: start-up can print the KV footprint and reject bad settings early.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader

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


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


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
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = str(_field(reader, "general.architecture") or "")
    if not arch:
        raise ValueError(f"{path} has no general.architecture key")

    def hp(name: str) -> Any:
        return _field(reader, f"{arch}.{name}")

    n_layers = int(hp("block_count"))
    n_head = hp("attention.head_count")
    n_head_kv = hp("attention.head_count_kv")
    if isinstance(n_head_kv, list):  # per-layer head counts exist (e.g. OpenELM); take the largest
        n_head_kv = max(n_head_kv)
    n_head_kv = int(n_head_kv if n_head_kv is not None else n_head)
    n_embd = int(hp("embedding_length"))
    default_head_dim = n_embd // int(n_head if not isinstance(n_head, list) else max(n_head))
    head_dim_k = int(hp("attention.key_length") or default_head_dim)
    head_dim_v = int(hp("attention.value_length") or default_head_dim)
    window = hp("attention.sliding_window")
    window = int(window) if window else None
    swa = _swa_layers(n_layers, hp("attention.sliding_window_pattern"), arch) if window else frozenset()
    ctx = hp("context_length")
    template = _field(reader, "tokenizer.chat_template")
    return ModelInfo(
        path=path,
        name=str(_field(reader, "general.name") or path.stem),
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
