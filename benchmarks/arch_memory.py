"""kvproxy's KV and recurrent-state bytes next to what llama.cpp logs, per architecture.

For the tiny models of tests/arch_models.py at two context sizes and four K/V types, and the real
Gemma 3 270M under llama-server with ``-np 1``, ``-np 4`` and its default (4 unified slots) at
131,072 tokens: the MiB llama.cpp prints when it creates the context (``llama_kv_cache: size``, one
line per cache, and ``llama_memory_recurrent: size``) beside kvproxy.model.memory's figure.

    .venv/bin/python benchmarks/arch_memory.py

(tests/test_arch_memory.py asserts the same within 1 % or the log's rounding.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.config import KVCacheType as T
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import ggml_type, kv_cache_parts
from tests.arch_models import ARCHS, tiny_model
from tests.llama_logged_memory import logged_contexts, parse
from tests.llama_servers import start_llama_server

TYPES = [(T.F16, T.F16), (T.Q8_0, T.Q8_0), (T.Q4_0, T.Q4_0), (T.Q8_0, T.Q4_0)]
MIB = 2**20


def row(model: str, setup: str, k: T, v: T, mine: tuple[int, int], logged: tuple[float, ...], rs: str) -> str:
    parts = [p for p in mine if p] if len(logged) < 2 else list(mine)
    ours = " + ".join(f"{p / MIB:.4f}" for p in parts)
    theirs = " + ".join(f"{x:.2f}" for x in logged)
    return f"| {model} | {setup} | {k.value}/{v.value} | {ours} | {theirs} | {rs} |"


def main() -> None:
    print(
        "| model | context | K/V | kvproxy MiB (full + sliding) | llama.cpp logged MiB "
        "| recurrent MiB (kvproxy / logged) |"
    )
    print("|---|---|---|---|---|---|")
    for arch in ARCHS:
        path = tiny_model(arch)
        shape = read_model_info(path).attention
        configs = [(n, k, v) for n in (4096, 16384) for k, v in TYPES]
        logged = logged_contexts(
            path,
            [{"n_ctx": n, "type_k": int(ggml_type(k)), "type_v": int(ggml_type(v))} for n, k, v in configs],
        )
        for (n, k, v), got in zip(configs, logged, strict=True):
            rs = (
                f"{shape.recurrent_bytes() / MIB:.4f} / {got.recurrent_mib:.2f}"
                if got.recurrent_mib is not None
                else "-"
            )
            print(row(arch, f"{n:,}", k, v, kv_cache_parts(shape, k, v, n), got.kv_mib, rs), flush=True)
    gemma = bundled_model_path()
    shape = read_model_info(gemma).attention
    with tempfile.TemporaryDirectory() as tmp:
        for slots, n_seq, unified, label in (
            (["-np", "1"], 1, False, "-np 1"),
            (["-np", "4"], 4, False, "-np 4"),
            ([], 4, True, "default (4, unified)"),
        ):
            for k in (T.F16, T.Q4_0):
                srv = start_llama_server(
                    gemma,
                    Path(tmp),
                    "-fit",
                    "off",
                    "-lv",
                    "4",
                    "-c",
                    "131072",
                    "-ctk",
                    k.value,
                    "-ctv",
                    k.value,
                    *slots,
                )
                try:
                    got = parse(srv.log.read_text())
                finally:
                    srv.kill()
                mine = kv_cache_parts(shape, k, k, 131072, n_seq=n_seq, kv_unified=unified)
                print(
                    row("Gemma 3 270M", f"131,072, llama-server {label}", k, k, mine, got.kv_mib, "-"),
                    flush=True,
                )


if __name__ == "__main__":
    main()
