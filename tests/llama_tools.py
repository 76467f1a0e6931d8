"""Where the llama.cpp binaries built from the pinned source are (built on first use, then cached)."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

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
