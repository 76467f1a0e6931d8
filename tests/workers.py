"""Parallel test workers (pytest-xdist, ``make test``) that do not slow each other down.

llama.cpp's CPU backend here runs on OpenMP, whose threads spin at every barrier before they sleep.
Two processes that each compute with two threads on two shared cores preempt each other's spinning
threads: a 60-token decode of the bundled Gemma measured 0.9 s alone and 46-50 s with a second such
process beside it. So each worker is pinned to a core of its own (the processes it starts inherit
that: ``kvproxy serve``'s default ``--threads`` is the cores it may use, one), and OpenMP is told to
sleep at once rather than spin where a test still asks for more threads than its worker has.
A run without workers (``pytest tests/test_x.py``) is left exactly as it was.
"""

from __future__ import annotations

import os


def worker_index() -> int | None:
    """This process's xdist worker number (``gw3`` is 3), or None outside a parallel run."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def isolate_worker() -> None:
    """Pin an xdist worker to one core (when there are as many cores as workers) and make OpenMP passive.

    Must run before llama_cpp is imported: libgomp reads its environment once, when it is loaded."""
    index = worker_index()
    if index is None:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cores = sorted(os.sched_getaffinity(0))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if 0 < workers <= len(cores):
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def llama_threads() -> int:
    """Threads for a test's own llama.cpp work (``-t``, ``threads=``): the cores this process may run
    on, at most two. A pinned worker has one core, and two threads there wait on each other at every
    barrier: llama-perplexity's 512 one-token decodes of Gemma took 13.6 s with ``-t 2`` and 10.5 s
    with ``-t 1`` on one core. Tests that compare two runs give both the same count (CPU numerics can
    depend on it), so any count serves them."""
    return max(1, min(2, len(os.sched_getaffinity(0))))
