"""The single worker thread that owns llama.cpp objects (a context is not thread-safe)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def close_on(executor: ThreadPoolExecutor, free: Callable[[], None]) -> None:
    """Free llama.cpp objects on the thread that used them, after its queued work, then stop it."""
    executor.submit(free).result()
    executor.shutdown(wait=True)
