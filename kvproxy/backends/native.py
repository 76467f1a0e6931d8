"""llama.cpp's libraries load before numpy's in a process that will load a model.

With a CUDA build of llama.cpp, numpy (its bundled OpenBLAS) loaded first made the first model load
on the GPU crash the process (seen on an H200, docs/design.md). Importing llama_cpp loads its
libraries first, then numpy itself. ``import kvproxy`` no longer does it (every CLI call and test
worker paid for it): the entry points of processes that load a model call :func:`load_llama_first`
before anything imports numpy (``kvproxy serve``/``backend``/``calibrate``, the start-up probe's
child).
"""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger(__name__)


def load_llama_first() -> None:
    if "llama_cpp" in sys.modules:
        return
    if "numpy" in sys.modules:  # too late for the order to matter; say so rather than pretend
        log.debug("numpy was loaded before llama.cpp's libraries")
    with contextlib.suppress(ImportError, OSError):  # a dependency; the proxy alone does not need it
        import llama_cpp  # noqa: F401
