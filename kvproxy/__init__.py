"""kvproxy: an OpenAI-compatible proxy for llama.cpp that measures what a quantized KV cache costs."""

import contextlib

# llama.cpp's libraries load before numpy's: with a CUDA build of llama.cpp, numpy (its bundled
# OpenBLAS) loaded first made the first model load on the GPU crash the process (seen on an H200,
# docs/design.md). Importing llama_cpp loads its libraries first, then numpy itself.
with contextlib.suppress(ImportError, OSError):  # a dependency; the proxy alone does not need it
    import llama_cpp  # noqa: F401

__version__ = "0.1.0"
