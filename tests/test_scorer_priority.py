"""The embedded scorer runs in Linux's SCHED_IDLE class, and so do llama.cpp's threads it starts.

With a plain nice value, exact scoring slowed the clients of the same process by half
(benchmarks/embedded_shadow_cost.py: 1.51x the per-token latency at p50): the two llama.cpp thread
teams shared two cores and each one's barriers waited on threads the other had preempted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest

from kvproxy.config import Settings
from kvproxy.deployments.build import embedded_deployment
from kvproxy.model.gguf_info import read_model_info
from kvproxy.scoring.embedded import ScoreRequest
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")


def _policies() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out[int(tid)] = os.sched_getscheduler(int(tid))
    return out


def test_scoring_threads_are_idle_class_and_serving_threads_are_not(gemma_path: Path) -> None:
    settings = Settings(model=gemma_path, ctx_size=256, shadow_rate=0, threads=THREADS_N)
    deployment = embedded_deployment(settings, read_model_info(gemma_path))

    async def run() -> tuple[int, int, dict[int, int], dict[int, int]]:
        await deployment.start()
        try:
            before = _policies()
            scorer = deployment.scorer
            tokens = deployment.backend.tokenize("The quick brown fox jumps over the lazy dog", add_bos=True)
            scores = await scorer.score_request(ScoreRequest(tokens[:5], tokens[5:]))
            assert len(scores) == len(tokens) - 5
            loop = asyncio.get_running_loop()
            worker = await loop.run_in_executor(scorer._executor, threading.get_native_id)
            serving = await loop.run_in_executor(deployment.backend._executor, threading.get_native_id)
            return worker, serving, before, _policies()
        finally:
            await deployment.stop()
            deployment.close()

    worker, serving, before, after = asyncio.run(run())
    assert after[worker] == os.SCHED_IDLE
    assert after[serving] == os.SCHED_OTHER
    assert after[threading.get_native_id()] == os.SCHED_OTHER  # the event loop's thread
    # llama.cpp's compute threads for the scoring contexts were started from the worker: they
    # inherited its class (two threads: the worker itself computes too, plus one more at least)
    idle = [tid for tid, policy in after.items() if policy == os.SCHED_IDLE]
    assert len(idle) >= settings.threads, (idle, after)
    assert all(policy == os.SCHED_OTHER for tid, policy in before.items() if tid not in idle)
