"""What llama.cpp itself logs about the memory it allocates for a context, read in a child process.

llama.cpp prints one line per cache when it creates a context (``llama_kv_cache: size = X MiB (N
cells, L layers, S/S seqs), K (type): ... MiB, V (type): ... MiB``; for a recurrent state
``llama_memory_recurrent: size = X MiB (...), R (f32): ..., S (f32): ...``). Each context is made in a
fresh child process (llama-cpp-python with ``verbose=True``), so an abort stays there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 2**20

CHILD = r"""
import json, sys, llama_cpp
path, configs = sys.argv[1], json.loads(sys.argv[2])
for c in configs:
    llm = llama_cpp.Llama(path, n_ctx=c["n_ctx"], n_batch=c.get("n_batch", 512), type_k=c["type_k"],
                          type_v=c["type_v"], flash_attn=c.get("flash_attn", True), swa_full=False,
                          n_threads=1, verbose=True)
    print("@@@ end of context", file=sys.stderr, flush=True)
    llm.close()
"""

KV_LINE = re.compile(
    r"llama_kv_cache: size =\s+([0-9.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers,\s+(\d+)/(\d+) seqs\)"
)
RS_LINE = re.compile(r"llama_memory_recurrent: size =\s+([0-9.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")


@dataclass(frozen=True)
class Logged:
    """One context's caches as llama.cpp logged them."""

    kv_mib: tuple[float, ...]  # one per KV cache (a sliding-window model has two)
    kv_cells: tuple[int, ...]
    kv_layers: tuple[int, ...]
    recurrent_mib: float | None

    @property
    def kv_bytes(self) -> float:
        return sum(self.kv_mib) * MIB


def parse(log: str) -> Logged:
    kv = KV_LINE.findall(log)
    rs = RS_LINE.findall(log)
    return Logged(
        tuple(float(m[0]) for m in kv),
        tuple(int(m[1]) for m in kv),
        tuple(int(m[2]) for m in kv),
        float(rs[0][0]) if rs else None,
    )


def logged_contexts(path: Path, configs: list[dict[str, Any]]) -> list[Logged]:
    """Create each context (keys of llama_cpp.Llama: n_ctx, type_k, type_v as ggml type ids,
    flash_attn) and return what llama.cpp logged for each, in order."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    parts = out.stderr.split("@@@ end of context")[: len(configs)]
    return [parse(p) for p in parts]


def within_log_precision(mine_bytes: float, logged_mib: float, rel: float = 0.01) -> bool:
    """Equal within ``rel``, or within the log's own rounding (it prints MiB to 2 decimals)."""
    mine = mine_bytes / MIB
    return abs(mine - logged_mib) <= max(rel * logged_mib, 0.005 + 1e-9)
