"""Tiny random-weight models of the architectures users bring: made once, cached, reused.

* ``qwen35moe``, ``qwen35``, ``gemma3``: written by the pinned llama.cpp's own ``test-llama-archs``
  (built beside llama-server by scripts/build-llama-tools.sh), with a fixed seed: the same bytes every
  time (its weights come from ``std::mt19937`` seeded with the seed and each tensor's name).
  Each has 2 layers, a 128-token "test" vocabulary (no BOS or EOS: the case that aborted kvproxy)
  and, for the Qwen models, layer 0 recurrent (gated delta net) and layer 1 attention.
* ``gemma4``: the saver writes no gemma4 model, so tests/gemma4_gguf.py writes one with ``gguf``.
* ``llama``: a GQA Llama (8 query heads, 2 KV heads) from tests/tiny_gguf.py.

They live under the llama.cpp build cache (``.../llama.cpp-<version>/tiny-models``), so a new
llama.cpp makes new ones. Files appear atomically (written aside, then renamed), so concurrent test
processes never read half a model.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, GGUFWriter

from tests.gemma4_gguf import write_tiny_gemma4
from tests.llama_tools import llama_bin
from tests.tiny_gguf import write_tiny_llama

ARCHS = ("qwen35moe", "qwen35", "gemma3", "gemma4", "llama")
SEED = 42
# name: (llama.cpp architecture, the file test-llama-archs writes); "llama-dense" is its own Llama
# (one KV head per query head, the same 128-token "test" vocabulary as the others)
_SAVED_BY_LLAMA_CPP = {
    "qwen35moe": ("qwen35moe", "qwen35moe-moe"),
    "qwen35": ("qwen35", "qwen35-dense"),
    "gemma3": ("gemma3", "gemma3-dense"),
    "llama-dense": ("llama", "llama-dense"),
}


def cache_dir() -> Path:
    d = llama_bin().parent / "tiny-models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic(dest: Path, write: Callable[[Path], object]) -> Path:
    if dest.exists():
        return dest
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _saved_by_llama_cpp(name: str, dest: Path) -> None:
    arch, stem = _SAVED_BY_LLAMA_CPP[name]
    with tempfile.TemporaryDirectory(dir=dest.parent) as out:
        subprocess.run(
            [str(llama_bin() / "test-llama-archs"), "-a", f"^{arch}$", "-s", str(SEED), "-o", out],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(Path(out) / f"{stem}.gguf", dest)


def tiny_model(arch: str) -> Path:
    """The cached tiny model of ``arch`` (one of :data:`ARCHS`, or "llama-dense"), made on first use."""
    dest = cache_dir() / f"{arch}-seed{SEED}.gguf"
    if arch in _SAVED_BY_LLAMA_CPP:
        return _atomic(dest, lambda tmp: _saved_by_llama_cpp(arch, tmp))
    if arch == "gemma4":
        return _atomic(dest, write_tiny_gemma4)
    if arch == "llama":
        return _atomic(dest, write_tiny_llama)
    raise ValueError(f"no tiny model for {arch}")


def with_chat_template(src: Path, template: str, dest: Path) -> Path:
    """A copy of ``src`` whose ``tokenizer.chat_template`` is ``template`` (what a real GGUF carries)."""
    return rewritten(src, dest, {"tokenizer.chat_template": template})


def rewritten(src: Path, dest: Path, changes: dict[str, Any], *, architecture: str | None = None) -> Path:
    """A copy of ``src`` with some metadata values replaced or added (strings, ints as uint32,
    floats as float32), the tensors as they were; ``architecture`` renames the architecture and its
    keys."""
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(dest), architecture or arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in changes:
            continue
        if architecture and name.startswith(f"{arch}."):
            name = f"{architecture}.{name[len(arch) + 1 :]}"
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        if vtype == GGUFValueType.ARRAY and not field.data:  # the writer refuses empty arrays
            continue
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, value in changes.items():
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_uint32(name, int(value))
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
