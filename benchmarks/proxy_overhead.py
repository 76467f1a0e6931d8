"""Proxy overhead, side by side in one run: direct to a fake upstream, through kvproxy (shadow off,
shadow rate 1.0 with the fake as a fast top-K reference) and through the LiteLLM proxy.

Placement on a 2-core machine: the fake upstream (benchmarks/fake_upstream.py) and the load
generator (benchmarks/loadgen.py, aiohttp in its own process) share core 0; each proxy runs alone on
core 1 (``taskset``), one process. The proxy's CPU time is read from /proc (its whole process tree)
around every measurement. Targets are run in turn inside every round, and rounds repeat, so drifts of
the machine hit every target alike; the tables show medians over rounds.

    .venv/bin/python benchmarks/proxy_overhead.py [--rounds 3] [--duration 4] [--litellm PATH]

LiteLLM is looked for in ``$KVPROXY_CACHE/litellm-venv`` (``scripts/litellm-venv.sh`` creates it);
without it that column is skipped, and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CACHE = Path(os.environ.get("KVPROXY_CACHE", Path.home() / ".cache" / "kvproxy"))
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry)] = fields
        children[int(fields[1])].append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / TICK
        todo.extend(children.get(p, []))
    return total


@dataclass
class Target:
    name: str
    url: str  # base, up to /v1
    model: str
    process: subprocess.Popen[bytes] | None = None


def start(cmd: list[str], core: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(core), *cmd],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def measure(
    target: Target, *, concurrency: int, stream: bool, duration: float, requests: int
) -> dict[str, float]:
    cmd = [
        "taskset", "-c", "0", PY, str(ROOT / "benchmarks" / "loadgen.py"),
        "--url", f"{target.url}/chat/completions", "--model", target.model,
        "--concurrency", str(concurrency), "--duration", str(duration),
        "--requests", str(requests), "--warmup", str(max(20, concurrency)),
    ]  # fmt: skip
    if stream:
        cmd.append("--stream")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd += ["--out", out.name]
        before = shadow_counts(target)
        cpu0 = tree_cpu(target.process.pid) if target.process else 0.0
        subprocess.run(cmd, capture_output=True, check=True)
        cpu1 = tree_cpu(target.process.pid) if target.process else 0.0
        r = json.loads(Path(out.name).read_text())
        time.sleep(0.5)  # let queued shadow jobs finish before counting
        after = shadow_counts(target)
    lat = sorted(r["latencies"])
    n = len(lat)
    result = {
        "n": n,
        "errors": r["errors"],
        "p50": statistics.median(lat) * 1e3,
        "p99": lat[min(n - 1, int(0.99 * n))] * 1e3,
        "rps": n / r["wall"],
        # warm-up requests run inside the same window; count them in the CPU division
        "cpu_ms": (cpu1 - cpu0) * 1e3 / (n + max(20, concurrency)) if target.process else 0.0,
    }
    if before is not None and after is not None:
        picked = (after["sampled"] + after["shed"]) - (before["sampled"] + before["shed"])
        result["scored_pct"] = 100 * (after["scored"] - before["scored"]) / max(picked, 1)
    if stream:
        ttft = sorted(r["ttfts"])
        result["ttft50"] = statistics.median(ttft) * 1e3
        result["ttft99"] = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1e3
    return result


def shadow_counts(target: Target) -> dict[str, int] | None:
    """kvproxy's shadow counters (None for other targets)."""
    if not target.name.startswith("kvproxy"):
        return None
    base = target.url.removesuffix("/v1")
    st = httpx.get(f"{base}/kvproxy/v1/status", timeout=10).json()["deployments"][0]["shadow"]
    return {k: int(st[k]) for k in ("sampled", "scored", "shed")}


def litellm_bin(explicit: str | None) -> Path | None:
    path = Path(explicit) if explicit else CACHE / "litellm-venv" / "bin" / "litellm"
    return path if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--litellm", help="the litellm executable (default: $KVPROXY_CACHE/litellm-venv)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (quick iterations)")
    ap.add_argument(
        "--delay-ms", type=float, default=0.0, help="the fake upstream's time per token (0: instant answers)"
    )
    ap.add_argument("--no-shadow", action="store_true", help="skip the shadow-rate-1.0 target")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kvproxy-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port = free_port()
        procs.append(
            start(
                [
                    PY,
                    str(ROOT / "benchmarks" / "fake_upstream.py"),
                    "--port",
                    str(up_port),
                    "--delay-ms",
                    str(args.delay_ms),
                ],
                0,
                tmp / "up.log",
            )
        )
        up = f"http://127.0.0.1:{up_port}"
        wait_http(f"{up}/health")
        targets = [Target("direct", f"{up}/v1", "fake")]
        kinds = [("kvproxy", ["--shadow-rate", "0"])]
        if not args.no_shadow:
            kinds.append(("kvproxy shadow 1.0", ["--shadow-rate", "1", "--reference", up]))
        for name, extra in kinds:
            port = free_port()
            p = start(
                [PY, "-m", "kvproxy", "serve", "--primary", up, "--alias", "fake", "--port", str(port),
                 "--log-level", "warning", *extra],
                1, tmp / f"{name.replace(' ', '_')}.log",
            )  # fmt: skip
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/health")
            targets.append(Target(name, f"http://127.0.0.1:{port}/v1", "fake", p))
        exe = None if args.no_litellm else litellm_bin(args.litellm)
        if exe is None and not args.no_litellm:
            print("LiteLLM not found: run scripts/litellm-venv.sh (its column is skipped)", file=sys.stderr)
        if exe is not None:
            port = free_port()
            cfg = tmp / "litellm.yaml"
            cfg.write_text(
                "model_list:\n  - model_name: fake\n    litellm_params:\n"
                f"      model: openai/fake\n      api_base: {up}/v1\n      api_key: none\n"
            )
            p = start(
                [str(exe), "--config", str(cfg), "--port", str(port), "--num_workers", "1"],
                1, tmp / "litellm.log", env={
                    "LITELLM_LOG": "ERROR",
                    "LITELLM_TELEMETRY": "False",
                    "LITELLM_MASTER_KEY": "sk-kvproxy-bench-0123456789abcdef",
                },
            )  # fmt: skip
            procs.append(p)
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=300)
            targets.append(Target("litellm", f"http://127.0.0.1:{port}/v1", "fake", p))

        results: dict[tuple[str, bool, int], list[dict[str, float]]] = defaultdict(list)
        for rnd in range(args.rounds):
            for stream in (False, True):
                for c in levels:
                    for t in targets:
                        r = measure(t, concurrency=c, stream=stream, duration=args.duration, requests=100_000)
                        results[(t.name, stream, c)].append(r)
                        print(
                            f"round {rnd + 1} {'stream' if stream else 'json  '} c={c:<3} {t.name:<20} "
                            f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  {r['rps']:8.0f}/s  "
                            f"cpu {r['cpu_ms']:6.3f} ms  errors {r['errors']}",
                            file=sys.stderr,
                            flush=True,
                        )
        report(results, [t.name for t in targets], levels)
        if args.json:
            args.json.write_text(
                json.dumps({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in results.items()}, indent=1)
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def med(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def report(
    results: dict[tuple[str, bool, int], list[dict[str, float]]], names: list[str], levels: list[int]
) -> None:
    for stream in (False, True):
        kind = "16-chunk streams" if stream else "non-streaming requests"
        print(f"\n### {kind} (medians over rounds)\n")
        head = "| target | c | p50 ms | p99 ms | added p50 | added p99 |"
        head += " TTFT p50 ms | added TTFT p50 |" if stream else ""
        head += " per s | proxy CPU ms | shadow scored | errors |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for c in levels:
            base = results[("direct", stream, c)]
            for name in names:
                rs = results[(name, stream, c)]
                row = f"| {name} | {c} | {med(rs, 'p50'):.2f} | {med(rs, 'p99'):.2f} | "
                row += (
                    f"{med(rs, 'p50') - med(base, 'p50'):+.2f} | {med(rs, 'p99') - med(base, 'p99'):+.2f} | "
                )
                if stream:
                    row += f"{med(rs, 'ttft50'):.2f} | {med(rs, 'ttft50') - med(base, 'ttft50'):+.2f} | "
                cpu = f"{med(rs, 'cpu_ms'):.3f}" if name != "direct" else "-"
                scored = f"{med(rs, 'scored_pct'):.0f} %" if "shadow" in name else "-"
                row += f"{med(rs, 'rps'):.0f} | {cpu} | {scored} | {sum(int(r['errors']) for r in rs)} |"
                print(row)
    print("\n### ratios\n")
    for stream in (False, True):
        kind = "streams" if stream else "requests"
        top = max(levels)
        if ("litellm", stream, top) in results:
            ratio = med(results[("kvproxy", stream, top)], "rps") / med(
                results[("litellm", stream, top)], "rps"
            )
            print(f"- throughput at c={top}, {kind}: kvproxy / LiteLLM = {ratio:.1f}x")
        for c in levels:
            if ("kvproxy shadow 1.0", stream, c) not in results:
                continue
            a, b = results[("kvproxy", stream, c)], results[("kvproxy shadow 1.0", stream, c)]
            print(
                f"- shadow 1.0 vs off, {kind}, c={c}: client p99 {med(b, 'p99') / med(a, 'p99') - 1:+.1%}, "
                f"p50 {med(b, 'p50') / med(a, 'p50') - 1:+.1%}"
            )


if __name__ == "__main__":
    main()
