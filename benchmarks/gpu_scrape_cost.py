"""What a /metrics scrape and a status poll cost the event loop, with NVML read on the loop at each
call (how kvproxy did it before issue 16) and from the monitor's cache (now), side by side.

    python3 benchmarks/gpu_scrape_cost.py [--requests 200] [--seconds 20]

The app runs in this process and is called through ``httpx.ASGITransport`` on the same event loop,
so the loop thread's CPU time around a request (``time.thread_time``) is what that request cost the
loop. ``/health`` is measured the same way as the floor of the transport. Then, for ``--seconds``,
a 1 Hz scrape of both routes runs while kvproxy's load watch (kvproxy.shadow.loadwatch) is sampled every
5 ms: how often it would have shed shadow sampling because of the scrapes. Needs a GPU for the two
modes to differ; on a machine without one both read "no GPU". Writes gpu_scrape_cost.json to $OUT
when that is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from kvproxy.app import create_app
from kvproxy.deployments.build import http_deployment
from kvproxy.deployments.spec import DeploymentSpec
from kvproxy.shadow.loadwatch import loop_load
from kvproxy.telemetry.gpu import GpuMonitor, GpuReading, NvmlReader, read_gpus


class Absent:
    """The baseline: a host without a GPU (what the scrape costs without any GPU reading)."""

    def open(self) -> bool:
        return False

    def read(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        pass


BASELINE, BEFORE, NOW = "no GPU (baseline)", "NVML on the loop (before)", "cached monitor (now)"


class OnTheLoop(GpuMonitor):
    """The old way: NVML opened, read and shut down at every scrape and status poll, on the loop."""

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def latest(self) -> list[GpuReading] | None:
        return read_gpus()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(mode: str, requests: int, seconds: float) -> dict[str, Any]:
    monitor = {BASELINE: GpuMonitor(Absent()), BEFORE: OnTheLoop(), NOW: GpuMonitor(NvmlReader())}[mode]
    spec = DeploymentSpec.model_validate({"model": "m", "primary": {"urls": ["http://127.0.0.1:9"]}})
    app = create_app(http_deployment(spec), gpu=monitor)
    monitor.start()
    await monitor.first_reading()
    watch = loop_load()
    out: dict[str, Any] = {"mode": mode}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://k") as http:
        for path in ("/health", "/metrics", "/kvproxy/v1/status"):
            await http.get(path)  # warm
            cpu = []
            for _ in range(requests):
                t0 = time.thread_time()
                r = await http.get(path)
                cpu.append((time.thread_time() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code)
            out[path] = {"median_ms": statistics.median(cpu), "p99_ms": percentile(cpu, 0.99)}
        busy = samples = 0
        deadline = time.monotonic() + seconds
        next_scrape = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() >= next_scrape:
                await http.get("/metrics")
                await http.get("/kvproxy/v1/status")
                next_scrape += 1.0
            await asyncio.sleep(0.005)
            samples += 1
            busy += watch.busy
        out["watch"] = {"samples": samples, "busy": busy, "max_lag_ms": watch.lag * 1000}
        status = (await http.get("/kvproxy/v1/status")).json()
        out["gpu"] = status["gpu"]
    await monitor.stop()
    await watch.stop()
    return out


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [await measure(mode, args.requests, args.seconds) for mode in (BASELINE, BEFORE, NOW)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    gpus = read_gpus()
    print(f"GPUs: {[g.name for g in gpus] if gpus else 'none (NVML not available)'}", flush=True)
    results = asyncio.run(main_async(args))
    base = results[0]
    print(f"\nevent-loop CPU per request, ms (median / p99), {args.requests} requests each;")
    print("extra: the median over the no-GPU baseline's (what reading the GPU adds)")
    print(f"{'mode':<24}{'/health':>16}{'/metrics':>16}{'status':>16}{'extra/scrape':>14}{'extra/poll':>12}")
    for r in results:
        cells = [
            f"{r[p]['median_ms']:.3f} / {r[p]['p99_ms']:.3f}"
            for p in ("/health", "/metrics", "/kvproxy/v1/status")
        ]
        extra_m = r["/metrics"]["median_ms"] - base["/metrics"]["median_ms"]
        extra_s = r["/kvproxy/v1/status"]["median_ms"] - base["/kvproxy/v1/status"]["median_ms"]
        print(f"{r['mode']:<24}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}{extra_m:>14.3f}{extra_s:>12.3f}")
    print(f"\nload watch during a 1 Hz scrape for {args.seconds:.0f} s (samples every 5 ms)")
    for r in results:
        w = r["watch"]
        print(f"{r['mode']:<24} busy in {w['busy']} of {w['samples']} samples")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_scrape_cost.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
