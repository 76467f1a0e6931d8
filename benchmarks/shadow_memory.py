"""Memory of a proxy that shadows every request: RSS after 1,000 shadowed requests against after
10,000 (a job's prompt, tokens and scores must be dropped once scored; nothing may accumulate).

Starts the fake upstream (benchmarks/fake_upstream.py, 1 ms a token, also the top-K reference) and
``kvproxy serve --primary ... --reference ... --shadow-rate 1``, drives it with the load generator,
and reads the proxy's VmRSS from /proc together with its shadow counters.

    .venv/bin/python benchmarks/shadow_memory.py [--first 1000] [--total 10000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_overhead import PY, ROOT, free_port, start, wait_http


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def drive(url: str, n: int, concurrency: int) -> None:
    subprocess.run(
        [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--url", f"{url}/v1/chat/completions",
         "--model", "fake", "--concurrency", str(concurrency), "--requests", str(n), "--warmup", "0",
         "--out", "/dev/null"],
        check=True,
    )  # fmt: skip


def shadow(url: str) -> dict[str, int]:
    st = httpx.get(f"{url}/kvproxy/v1/status", timeout=10).json()["deployments"][0]["shadow"]
    return {k: st[k] for k in ("sampled", "scored", "dropped", "failed", "shed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--total", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=2)  # calm enough that every job is scored
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvproxy-mem-"))
    up_port, port = free_port(), free_port()
    up = f"http://127.0.0.1:{up_port}"
    url = f"http://127.0.0.1:{port}"
    procs = [
        start([PY, str(ROOT / "benchmarks" / "fake_upstream.py"), "--port", str(up_port), "--delay-ms", "1"],
              0, tmp / "up.log"),
    ]  # fmt: skip
    try:
        wait_http(f"{up}/health")
        proxy = start(
            [PY, "-m", "kvproxy", "serve", "--primary", up, "--reference", up, "--alias", "fake",
             "--port", str(port), "--shadow-rate", "1", "--log-level", "warning"],
            1, tmp / "proxy.log",
        )  # fmt: skip
        procs.append(proxy)
        wait_http(f"{url}/health")
        start_rss = rss_mib(proxy.pid)
        drive(url, args.first, args.concurrency)
        first_rss, first = rss_mib(proxy.pid), shadow(url)
        drive(url, args.total - args.first, args.concurrency)
        total_rss, total = rss_mib(proxy.pid), shadow(url)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
    print("| after | requests | shadow sampled / scored / dropped / shed | RSS MiB |")
    print("|---|---|---|---|")
    print(f"| start | 0 | - | {start_rss:.1f} |")
    for label, n, s, r in (("first", args.first, first, first_rss), ("total", args.total, total, total_rss)):
        print(
            f"| {label} | {n:,} | {s['sampled']} / {s['scored']} / {s['dropped']} / {s['shed']} | {r:.1f} |"
        )
    print(f"\nRSS growth from {args.first:,} to {args.total:,} requests: {total_rss - first_rss:+.1f} MiB")


if __name__ == "__main__":
    main()
