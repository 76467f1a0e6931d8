"""Where the llama.cpp binaries built from the pinned source are (built on first use, then cached)."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@cache
def llama_bin() -> Path:
    given = os.environ.get("KVPROXY_LLAMA_BIN")
    if given:
        return Path(given)
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-llama-tools.sh"), sys.executable],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def read_base_tokens(path: Path) -> tuple[int, int, Any]:
    """Header of llama-perplexity's --kl-divergence-base file: n_ctx, n_chunk and the token ids."""
    import numpy as np

    with path.open("rb") as f:
        assert f.read(8) == b"_logits_"
        n_ctx = int(np.frombuffer(f.read(4), dtype=np.uint32)[0])
        _n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(8), dtype=np.int32))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype=np.int32)
    return n_ctx, n_chunk, tokens
