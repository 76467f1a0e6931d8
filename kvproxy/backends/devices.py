"""Which device a llama.cpp context computes on: what the banner, the status and /metrics say.

llama-cpp-python 0.3.36 binds no device enumeration, so ggml's own (``ggml_backend_dev_*``, exported
by the ggml library libllama links) is called through the library llama-cpp-python loaded. A CPU
build, or a library without those symbols, lists no GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from typing import Any

_GPU_TYPES = (1, 2)  # enum ggml_backend_dev_type: CPU 0, GPU 1, IGPU 2, ACCEL 3


@dataclass(frozen=True)
class Offload:
    """Where one model's layers run: ``layers`` of ``n_layers`` on ``device`` (None: the CPU)."""

    device: str | None
    layers: int
    n_layers: int

    def __str__(self) -> str:
        if self.device is None or self.layers == 0:
            return "CPU"
        share = (
            f"all {self.n_layers} layers"
            if self.layers >= self.n_layers
            else f"{self.layers} of {self.n_layers} layers"
        )
        return f"{self.device}, {share}"

    @property
    def label(self) -> str:
        """The metrics label: ``CPU`` or the device's name (e.g. ``CUDA0``)."""
        if self.device is None or self.layers == 0:
            return "CPU"
        return "+".join(part.split(" ")[0] for part in self.device.split(" + "))


def _lib() -> Any:
    from llama_cpp import llama_cpp

    return llama_cpp._lib


@cache
def gpu_devices() -> tuple[str, ...]:
    """GPU devices ggml sees, as ``NAME (description)``, e.g. ``CUDA0 (NVIDIA H200)``."""
    try:
        lib = _lib()
        count, get = lib.ggml_backend_dev_count, lib.ggml_backend_dev_get
        name, description, kind = (
            lib.ggml_backend_dev_name,
            lib.ggml_backend_dev_description,
            lib.ggml_backend_dev_type,
        )
    except (ImportError, AttributeError, OSError):
        return ()
    count.restype = ctypes.c_size_t
    get.argtypes, get.restype = [ctypes.c_size_t], ctypes.c_void_p
    for f in (name, description):
        f.argtypes, f.restype = [ctypes.c_void_p], ctypes.c_char_p
    kind.argtypes, kind.restype = [ctypes.c_void_p], ctypes.c_int
    out = []
    for i in range(count()):
        dev = get(i)
        if kind(dev) in _GPU_TYPES:
            out.append(f"{name(dev).decode()} ({description(dev).decode()})")
    return tuple(out)


def gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend that can take layers."""
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def resolve_gpu_layers(requested: int | None) -> int:
    """llama.cpp's ``n_gpu_layers``: as requested, or by default all (-1) where a GPU can take them."""
    if requested is not None:
        return requested
    return -1 if gpu_offload_supported() and gpu_devices() else 0


def offload(requested: int | None, n_layers: int) -> Offload:
    layers = resolve_gpu_layers(requested)
    devices = gpu_devices() if gpu_offload_supported() else ()
    if not devices or layers == 0:
        return Offload(None, 0, n_layers)
    # several GPUs: llama.cpp splits the layers across them (its default split mode)
    return Offload(" + ".join(devices), n_layers if layers < 0 else min(layers, n_layers), n_layers)


def parse_cpu_features(system_info: str) -> tuple[str, ...]:
    """The features ggml's CPU backend was compiled with, from ``llama_print_system_info()``:
    ``"CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | ..."`` gives ``("SSE3", "AVX2")``. Other backends'
    sections (``CUDA : ...``) are not the CPU's."""
    features: list[str] = []
    section = ""
    for part in system_info.split("|"):
        if ":" in part:  # "CPU : SSE3 = 1" opens a backend's section
            section, _, part = part.partition(":")
            section = section.strip()
        name, eq, value = part.partition("=")
        if section == "CPU" and eq and value.strip() == "1":
            features.append(name.strip())
    return tuple(features)


@cache
def cpu_build_features() -> tuple[str, ...]:
    """What the installed llama.cpp's CPU code uses (the banner shows it: a build for another CPU
    dies of SIGILL, scripts/llama-cpu.sh)."""
    try:
        import llama_cpp
    except ImportError:
        return ()
    return parse_cpu_features(llama_cpp.llama_print_system_info().decode(errors="replace"))
