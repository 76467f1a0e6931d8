"""GPU memory collection: on a machine without a GPU, an explicit 'no GPU' state and no readings."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from kvproxy.gpu import GpuCollector, read_gpus


def test_no_gpu_here_means_present_0_and_no_zero_readings() -> None:
    gpus = read_gpus()
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    text = generate_latest(registry).decode()
    if gpus:  # a machine with a GPU (the device check runs benchmarks/gpu_memory_check.py there)
        assert "kvproxy_gpu_present 1.0" in text and "kvproxy_gpu_memory_total_bytes{" in text
        return
    assert registry.get_sample_value("kvproxy_gpu_present") == 0
    assert "kvproxy_gpu_memory_used_bytes" not in text
    assert "kvproxy_gpu_memory_total_bytes" not in text
