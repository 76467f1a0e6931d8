"""How busy the event loop is, so that shadow work gives way to clients.

kvproxy serves from one event loop on one core. Shadow scoring shares it: when clients keep the loop
busy, every millisecond of shadow work is a millisecond some client waits. The watch measures how
late a periodic timer fires (the loop's lag, smoothed); above ``busy_lag`` the proxy is saturated,
and the shadow path backs off: new requests are not sampled (counted as ``shed``) and queued jobs wait
for a calm loop, or are dropped after ``max_defer`` seconds. Measured cost: one wake-up every 5 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref

INTERVAL = 0.005
_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLoad] = weakref.WeakKeyDictionary()


class LoopLoad:
    def __init__(self, *, busy_lag: float = 0.002, alpha: float = 0.2) -> None:
        self.busy_lag = busy_lag
        self.alpha = alpha
        self.lag = 0.0  # smoothed lateness of a 5 ms timer, seconds
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.lag > self.busy_lag

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="kvproxy-loop-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(INTERVAL)
            late = max(0.0, loop.time() - start - INTERVAL)
            self.lag += self.alpha * (late - self.lag)


def loop_load() -> LoopLoad:
    """The running loop's watch (one per loop, started on first use)."""
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        watch = _watches[loop] = LoopLoad()
    watch.start()
    return watch
