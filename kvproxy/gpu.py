"""GPU memory from NVML (nvidia-ml-py), as a Prometheus collector read at scrape time.

On a machine without an NVIDIA GPU (no driver, no library, no device) the collector exports
``kvproxy_gpu_present 0`` and nothing else: no zeros that would look like readings.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    used_bytes: int
    total_bytes: int
    processes: dict[int, int]  # pid -> bytes used on this GPU


def read_gpus() -> list[GpuReading] | None:
    """Every GPU's memory, or None when NVML is not available (no GPU on this machine)."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("no GPU: %s", exc)
        return None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            procs: dict[int, int] = {}
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.usedGpuMemory is not None:
                    procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out.append(
                GpuReading(
                    i,
                    name.decode() if isinstance(name, bytes) else str(name),
                    uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    int(mem.used),
                    int(mem.total),
                    procs,
                )
            )
        return out
    finally:
        pynvml.nvmlShutdown()


class GpuCollector(Collector):
    """Device used/total per GPU, and per process for the processes kvproxy knows (``pids``, each
    with a role label such as "kvproxy" or "primary")."""

    def __init__(self, pids: dict[int, str] | None = None) -> None:
        self.pids = pids if pids is not None else {os.getpid(): "kvproxy"}
        self._lock = threading.Lock()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # read at scrape time only: registering must not touch the GPU

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            gpus = read_gpus()
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


def gpu_status() -> list[dict[str, object]] | None:
    """VRAM used/total per GPU for the status endpoint (and the live quality page); None without one."""
    gpus = read_gpus()
    if not gpus:
        return None
    return [
        {"index": g.index, "name": g.name, "used_bytes": g.used_bytes, "total_bytes": g.total_bytes}
        for g in gpus
    ]
