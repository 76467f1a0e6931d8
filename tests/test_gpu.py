"""GPU memory: NVML opened once, read off the event loop, cached; both the GPU and the no-GPU branch
of the collector, on any machine (the readers are injected); the real NVML of this host too."""

from __future__ import annotations

import asyncio
import os
import threading

from prometheus_client import CollectorRegistry, generate_latest

from kvproxy.telemetry.gpu import GpuCollector, GpuMonitor, NvmlReader, gpu_status, read_gpus
from tests.gpu_fakes import CannedGpu, NoGpu


def exposition(monitor: GpuMonitor) -> tuple[CollectorRegistry, str]:
    registry = CollectorRegistry()
    registry.register(GpuCollector(monitor.latest))
    return registry, generate_latest(registry).decode()


def test_no_gpu_means_present_0_and_no_zero_readings() -> None:
    monitor = started(GpuMonitor(NoGpu()))
    registry, text = exposition(monitor)
    assert registry.get_sample_value("kvproxy_gpu_present") == 0
    assert "kvproxy_gpu_memory_used_bytes" not in text
    assert "kvproxy_gpu_memory_total_bytes" not in text
    assert gpu_status(monitor.latest()) is None


def test_a_gpu_is_read_once_at_start_then_off_the_loop_and_scrapes_read_the_cache() -> None:
    reader = CannedGpu()

    async def scenario() -> None:
        monitor = GpuMonitor(reader, interval=0.05)
        monitor.start()
        await monitor.first_reading()
        assert (reader.opens, reader.reads) == (1, 1)
        reads = reader.reads
        for _ in range(50):  # scrapes and status polls never touch the reader
            exposition(monitor)
            gpu_status(monitor.latest())
        assert reader.reads == reads
        await asyncio.sleep(0.3)  # the refresh goes on in the background
        assert reader.reads > reads
        assert threading.get_ident() not in reader.read_threads  # never on the event loop's thread
        await monitor.stop()
        assert (reader.opens, reader.closes) == (1, 1)

    asyncio.run(scenario())


def started(monitor: GpuMonitor) -> GpuMonitor:
    """Start and stop at once: the first reading, taken at start, stays cached."""

    async def both() -> None:
        monitor.start()
        await monitor.first_reading()
        await monitor.stop()

    asyncio.run(both())
    return monitor


def test_gpu_readings_and_this_process_share() -> None:
    monitor = started(GpuMonitor(CannedGpu(own_bytes=5 * 2**30)))
    registry, _ = exposition(monitor)
    value = registry.get_sample_value
    assert value("kvproxy_gpu_present") == 1
    assert value("kvproxy_gpu_memory_used_bytes", {"gpu": "0", "name": "NVIDIA H200"}) == 30 * 2**30
    assert value("kvproxy_gpu_memory_total_bytes", {"gpu": "0", "name": "NVIDIA H200"}) == 140 * 2**30
    own = {"gpu": "0", "pid": str(os.getpid()), "role": "kvproxy"}
    assert value("kvproxy_gpu_process_memory_bytes", own) == 5 * 2**30
    assert gpu_status(monitor.latest()) == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "used_bytes": 30 * 2**30,
            "total_bytes": 140 * 2**30,
            "process_bytes": 5 * 2**30,
        }
    ]


def test_this_hosts_nvml_agrees_with_the_monitor() -> None:
    """On a host without a GPU NVML does not open; on one with, the monitor reads what NVML reads."""
    direct = read_gpus()
    monitor = started(GpuMonitor(NvmlReader()))
    registry, _ = exposition(monitor)
    assert registry.get_sample_value("kvproxy_gpu_present") == (1 if direct else 0)
    if direct:
        latest = monitor.latest()
        assert latest is not None and [g.uuid for g in latest] == [g.uuid for g in direct]
