"""Check kvproxy's NVML collector against a process that allocates a known amount of GPU memory.

    python3 benchmarks/gpu_memory_check.py [--gib 16]

A child process creates a CUDA context with PyTorch, then allocates ``--gib`` GiB. The collector
(kvproxy.telemetry.gpu, nvidia-ml-py) reads the device and the child's own usage before and after; the
increases must equal the allocation within a few percent, and the device figure must agree with
CUDA's own ``cudaMemGetInfo`` (torch.cuda.mem_get_info) read inside the child. Prints a table and
writes gpu_memory_check.json to $OUT when that is set. Needs a GPU, PyTorch and nvidia-ml-py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from kvproxy.telemetry.gpu import GpuCollector, read_gpus

CHILD = r"""
import sys, torch
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info(); print("ready", total - free, flush=True); sys.stdin.readline()
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
x.fill_(1); torch.cuda.synchronize()
free, total = torch.cuda.mem_get_info(); print("allocated", total - free, flush=True); sys.stdin.readline()
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=16.0)
    args = parser.parse_args()
    gpus = read_gpus()
    if not gpus:
        sys.exit("no GPU: NVML sees none (kvproxy_gpu_present would be 0)")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(args.gib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin and child.stdout
    registry = CollectorRegistry()
    registry.register(GpuCollector({child.pid: "test", os.getpid(): "kvproxy"}))

    def sample(metric: str, **labels: str) -> float | None:
        return registry.get_sample_value(metric, {"gpu": "0", **labels})

    readings = {}
    for step in ("ready", "allocated"):
        word, cuda_used = child.stdout.readline().split()
        assert word == step
        g = read_gpus()[0]  # type: ignore[index]
        readings[step] = {
            "device_used": sample("kvproxy_gpu_memory_used_bytes", name=g.name),
            "device_total": sample("kvproxy_gpu_memory_total_bytes", name=g.name),
            "process": sample("kvproxy_gpu_process_memory_bytes", pid=str(child.pid), role="test"),
            "cuda_mem_get_info_used": float(cuda_used),
        }
        child.stdin.write("\n")
        child.stdin.flush()
    child.wait(timeout=60)
    alloc = args.gib * 2**30
    before, after = readings["ready"], readings["allocated"]
    result: dict[str, object] = {"gpu": gpus[0].name, "allocated_bytes": alloc, "readings": readings}
    rows = [("device used increase", (after["device_used"] or 0) - (before["device_used"] or 0))]
    if after["process"] is not None and before["process"] is not None:
        rows.append(("process usage increase", after["process"] - before["process"]))
    else:
        result["process_note"] = "NVML reported no per-process usage for the child (sandboxed driver?)"
    print(
        f"GPU: {gpus[0].name}, {gpus[0].total_bytes / 2**30:.1f} GiB; allocated {args.gib:g} GiB in a child\n"
    )
    print(f"{'reading':28} {'GiB':>9} {'vs allocation':>14}")
    for name, value in rows:
        print(f"{name:28} {value / 2**30:>9.3f} {value / alloc - 1:>+13.2%}")
    nvml_vs_cuda = (after["device_used"] or 0) / after["cuda_mem_get_info_used"] - 1
    print(
        f"{'device used: NVML vs CUDA':28} {(after['device_used'] or 0) / 2**30:>9.3f} {nvml_vs_cuda:>+13.2%}"
    )
    if "process_note" in result:
        print(result["process_note"])
    result["rows"] = {k: v for k, v in rows}
    result["nvml_vs_cuda"] = nvml_vs_cuda
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_memory_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
