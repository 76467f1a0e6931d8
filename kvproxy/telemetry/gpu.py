"""GPU memory from NVML (nvidia-ml-py): read off the event loop, cached, exported at scrape time.

NVML is initialised once, when the app starts (:class:`GpuMonitor`, in the lifespan), and read on a
worker thread every ``interval`` seconds; ``/metrics`` scrapes and status polls read the cached
readings and never call NVML on the event loop (an ``nvmlInit``/``nvmlShutdown`` pair per read
cost an H200 host about 11 ms, enough to trip the load watch: docs/benchmarks.md).

On a machine without an NVIDIA GPU (no driver, no library, no device) the monitor's readings are
None and the collector exports ``kvproxy_gpu_present 0`` and nothing else: no zeros that would look
like readings. The collector takes its source as a parameter (as prometheus_client's
``ProcessCollector`` takes ``proc=``), so both branches are tested on any machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvproxy.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    used_bytes: int
    total_bytes: int
    processes: dict[int, int]  # pid -> bytes used on this GPU


class GpuReader(Protocol):
    """Opens NVML (False: no GPU here), reads every GPU, closes. Called from one worker thread."""

    def open(self) -> bool: ...

    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    def __init__(self) -> None:
        self._nvml: Any = None

    def open(self) -> bool:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no device: all "no GPU"
            log.debug("no GPU: %s", exc)
            return False
        self._nvml = pynvml
        return True

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            procs: dict[int, int] = {}
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.usedGpuMemory is not None:
                    procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory)
            name, uuid = _text(nvml.nvmlDeviceGetName(h)), _text(nvml.nvmlDeviceGetUUID(h))
            out.append(GpuReading(i, name, uuid, int(mem.used), int(mem.total), procs))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def read_gpus() -> list[GpuReading] | None:
    """One reading, opening and closing NVML (scripts and benchmarks; the server uses a monitor)."""
    reader = NvmlReader()
    if not reader.open():
        return None
    try:
        return reader.read()
    finally:
        reader.close()


class GpuMonitor:
    """Readings refreshed every ``interval`` seconds on a worker thread; ``latest()`` is cheap."""

    def __init__(self, reader: GpuReader | None = None, *, interval: float = 2.0) -> None:
        self.reader = reader or NvmlReader()
        self.interval = interval
        self._latest: list[GpuReading] | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = False
        self._tried = False  # the first reading has been attempted (or NVML said no GPU)

    def latest(self) -> list[GpuReading] | None:
        """The last readings; None without a GPU (or before the first reading)."""
        return self._latest

    def start(self) -> None:
        """Open NVML and read, then every ``interval``, in a background task (start-up never waits)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kvproxy-gpu")

    async def _refresh(self) -> None:
        try:
            self._latest = await asyncio.to_thread(self.reader.read)
        except Exception as exc:  # a GPU that fell off the bus: say so, keep serving
            log.warning("reading GPU memory failed: %s", exc)
            self._latest = None

    async def _run(self) -> None:
        self._open = await asyncio.to_thread(self.reader.open)
        if not self._open:
            self._tried = True
            return
        while True:
            await self._refresh()
            self._tried = True
            await asyncio.sleep(self.interval)

    async def first_reading(self) -> None:
        """Wait for the first reading (or for NVML to say there is no GPU): tests and benchmarks."""
        while self._task is not None and not self._task.done() and not self._tried:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self._open:
            await asyncio.to_thread(self.reader.close)
            self._open = False


class GpuCollector(Collector):
    """Device used/total per GPU, and per process for the processes kvproxy knows (``pids``, each
    with a role label such as "kvproxy" or "primary"), from ``source`` (a monitor's ``latest``)."""

    def __init__(
        self, source: Callable[[], list[GpuReading] | None], pids: dict[int, str] | None = None
    ) -> None:
        self.source = source
        self.pids = pids if pids is not None else {os.getpid(): "kvproxy"}

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gpus = self.source()
        present = GaugeMetricFamily("kvproxy_gpu_present", "1 when NVML sees at least one GPU, else 0.")
        present.add_metric([], 1.0 if gpus else 0.0)
        yield present
        if not gpus:
            return
        used = GaugeMetricFamily(
            "kvproxy_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily(
            "kvproxy_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"]
        )
        proc = GaugeMetricFamily(
            "kvproxy_gpu_process_memory_bytes",
            "GPU memory of a process kvproxy knows.",
            labels=["gpu", "pid", "role"],
        )
        for g in gpus:
            used.add_metric([str(g.index), g.name], float(g.used_bytes))
            total.add_metric([str(g.index), g.name], float(g.total_bytes))
            for pid, role in self.pids.items():
                if pid in g.processes:
                    proc.add_metric([str(g.index), str(pid), role], float(g.processes[pid]))
        yield used
        yield total
        yield proc


def gpu_status(gpus: list[GpuReading] | None, pid: int | None = None) -> list[dict[str, object]] | None:
    """VRAM per GPU for the status endpoint (and the live quality page), with this process's own
    share when it uses the GPU; None without one."""
    if not gpus:
        return None
    pid = os.getpid() if pid is None else pid
    return [
        {
            "index": g.index,
            "name": g.name,
            "used_bytes": g.used_bytes,
            "total_bytes": g.total_bytes,
            "process_bytes": g.processes.get(pid),
        }
        for g in gpus
    ]
