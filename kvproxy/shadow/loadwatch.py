"""How busy the event loop is, so that shadow work gives way to clients.

kvproxy serves from one event loop on one core. Shadow scoring shares it: when clients keep the loop
busy, every millisecond of shadow work is a millisecond some client waits. The watch measures two
things from inside the loop: how late a 5 ms timer fires (the loop's lag, smoothed) and the loop
thread's own CPU use over the last 100 ms (``time.thread_time``: llama.cpp's threads in an embedded
process do not count). Above ``busy_lag`` or ``busy_cpu`` the proxy is saturated and the shadow path
backs off: new requests are not sampled (counted as ``shed``) and queued jobs wait for a calm loop, or
are dropped after ``max_defer`` seconds. Shadow work thus uses the loop's spare time, up to
``busy_cpu``. Its own cost: one wake-up every 5 ms.
"""

from __future__ import annotations

import asyncio
import time
import weakref

from kvproxy.tasks import cancel_and_wait

INTERVAL = 0.005
WINDOW = 0.1
_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLoad] = weakref.WeakKeyDictionary()


class LoopLoad:
    def __init__(self, *, busy_lag: float = 0.002, busy_cpu: float = 0.6, alpha: float = 0.2) -> None:
        self.busy_lag = busy_lag
        self.busy_cpu = busy_cpu
        self.alpha = alpha
        self.lag = 0.0  # smoothed lateness of a 5 ms timer, seconds
        self.cpu = 0.0  # the loop thread's CPU use over the last window, 0..1
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.lag > self.busy_lag or self.cpu > self.busy_cpu

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="kvproxy-loop-load")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        window_wall, window_cpu = loop.time(), time.thread_time()
        while True:
            start = loop.time()
            await asyncio.sleep(INTERVAL)
            now = loop.time()
            self.lag += self.alpha * (max(0.0, now - start - INTERVAL) - self.lag)
            if now - window_wall >= WINDOW:
                cpu = time.thread_time()
                self.cpu = (cpu - window_cpu) / (now - window_wall)
                window_wall, window_cpu = now, cpu


def loop_load() -> LoopLoad:
    """The running loop's watch (one per loop, started on first use)."""
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = LoopLoad()
    watch.start()
    return watch
