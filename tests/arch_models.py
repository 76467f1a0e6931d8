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
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


def atomic(dest: Path, write: Callable[[Path], object]) -> Path:
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
        return atomic(dest, lambda tmp: _saved_by_llama_cpp(arch, tmp))
    if arch == "gemma4":
        return atomic(dest, write_tiny_gemma4)
    if arch == "llama":
        return atomic(dest, write_tiny_llama)
    raise ValueError(f"no tiny model for {arch}")


def with_chat_template(src: Path, template: str, dest: Path) -> Path:
    """A copy of ``src`` whose ``tokenizer.chat_template`` is ``template`` (what a real GGUF carries)."""
    return rewritten(src, dest, {"tokenizer.chat_template": template})


def rewritten(src: Path, dest: Path, changes: dict[str, Any], *, architecture: str | None = None) -> Path:
    """A copy of ``src`` with some metadata values replaced or added (strings, ints as uint32,
    floats as float32), the tensors as they were; ``architecture`` renames the architecture and its
    keys.

    Byte-level: the other key/value pairs and the tensor infos are copied as they are and the tensor
    data in one block (its offsets are relative to the data section, so only the padding before it
    changes). Parsing and re-encoding every field with ``gguf`` (262,144 vocabulary strings in the
    bundled Gemma) took 15 s of CPU a copy; this takes well under one."""
    with src.open("rb") as f:
        header = f.read(24)
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", header)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{src}: not a GGUF v2+ file")
        kvs, end = _read_kvs(f, n_kv)
        infos, infos_end = _read_tensor_infos(f, end, n_tensors)
        align = (
            int(struct.unpack("<I", kvs["general.alignment"][4:8])[0]) if "general.alignment" in kvs else 32
        )
        data_start = -(-infos_end // align) * align
        arch = _string_value(kvs["general.architecture"])
        out: list[bytes] = []
        for name, value in kvs.items():
            if name in changes:
                continue
            if architecture and name == "general.architecture":
                value = _encode_value(architecture)
            elif architecture and name.startswith(f"{arch}."):
                name = f"{architecture}.{name[len(arch) + 1 :]}"
            out.append(_encode_string(name) + value)
        out += [_encode_string(name) + _encode_value(value) for name, value in changes.items()]
        head = struct.pack("<4sIQQ", b"GGUF", version, n_tensors, len(out)) + b"".join(out) + infos
        head += b"\0" * (-len(head) % align)
        with dest.open("wb") as g:
            g.write(head)
            f.seek(data_start)
            shutil.copyfileobj(f, g, 16 << 20)
    return dest


# GGUF value types: fixed sizes; 8 is a string, 9 an array
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read_kvs(f: BinaryIO, n_kv: int) -> tuple[dict[str, bytes], int]:
    """Each key's raw value bytes (its type included), in file order, and where the pairs end."""
    f.seek(24)
    buf = f.read(64 << 20)  # the metadata of any model used here fits
    pos = 24
    kvs: dict[str, bytes] = {}

    def skip(vtype: int, at: int, count: int = 1) -> int:
        if vtype in _SIZES:
            return at + _SIZES[vtype] * count
        if vtype == 8:
            for _ in range(count):
                at += 8 + int.from_bytes(buf[at - 24 : at - 16], "little")
            return at
        raise ValueError(f"unsupported GGUF value type {vtype}")

    for _ in range(n_kv):
        klen = int.from_bytes(buf[pos - 24 : pos - 16], "little")
        name = buf[pos - 16 : pos - 16 + klen].decode()
        vstart = pos + 8 + klen
        vtype = int.from_bytes(buf[vstart - 24 : vstart - 20], "little")
        if vtype == 9:
            sub = int.from_bytes(buf[vstart - 20 : vstart - 16], "little")
            count = int.from_bytes(buf[vstart - 16 : vstart - 8], "little")
            end = skip(sub, vstart + 16, count)
        else:
            end = skip(vtype, vstart + 4)
        kvs[name] = buf[vstart - 24 : end - 24]
        pos = end
    return kvs, pos


def _read_tensor_infos(f: BinaryIO, start: int, n_tensors: int) -> tuple[bytes, int]:
    """The tensor infos' raw bytes (name, dims, type, offset each) and where they end."""
    f.seek(start)
    buf = f.read(16 << 20)
    pos = 0
    for _ in range(n_tensors):
        pos += 8 + int.from_bytes(buf[pos : pos + 8], "little")
        n_dims = int.from_bytes(buf[pos : pos + 4], "little")
        pos += 4 + 8 * n_dims + 4 + 8
    return buf[:pos], start + pos


def _encode_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", 8) + _encode_string(value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    return struct.pack("<II", 4, int(value))


def _string_value(raw: bytes) -> str:
    return raw[12:].decode()
