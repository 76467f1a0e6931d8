"""The single worker thread that owns llama.cpp objects (a context is not thread-safe)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol


class Closable(Protocol):
    def close(self) -> None: ...


def close_on(executor: ThreadPoolExecutor, obj: Closable | None) -> None:
    """Close a llama.cpp object on the thread that used it, after its queued work, then stop that
    thread. The caller drops its reference afterwards: nothing can run on the thread any more."""
    if obj is not None:
        executor.submit(obj.close).result()
    executor.shutdown(wait=True)
