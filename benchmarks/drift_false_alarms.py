"""False alarms of the drift detector on a long stable run of real traffic.

Starts ``kvproxy serve`` on the embedded Gemma 3 270M with a fixed KV config and every request
shadowed (exact KLD against f16 on the same weights), sends ``--requests`` chat requests one at a
time (prompts cut from the bundled English text at varying offsets and lengths), and reads each
request's mean KLD from the change in the status's since-start sums. It prints the detector's
transitions seen live, then replays the measured values, resampled, through fresh detectors for a
much longer run (the detector is pure, so this is its exact behaviour on that distribution).

    .venv/bin/python benchmarks/drift_false_alarms.py [--requests 300] [--cache-type q8_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.corpus import english_text
from kvproxy.shadow.drift import DRIFT, WARNING, DriftDetector
from tests.conftest import start_server, stop_server


def settled(client: httpx.Client) -> dict[str, object]:
    while True:
        st = client.get("/kvproxy/v1/status").json()["deployments"][0]
        if st["shadow"]["queued"] == 0 and st["shadow"]["in_flight"] == 0:
            return st
        time.sleep(0.02)


def sums(st: dict[str, object]) -> tuple[float, int]:
    k = st["kld"]["since_start"]  # type: ignore[index]
    return (k["mean"] or 0.0) * k["tokens"], k["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--cache-type", default="q8_0")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replay-runs", type=int, default=20)
    ap.add_argument("--replay-length", type=int, default=5000)
    args = ap.parse_args()
    words = english_text().split()
    rng = np.random.default_rng(0)
    proxy = start_server(
        "-ctk", args.cache_type, "-ctv", args.cache_type, "--shadow-rate", "1", "--ctx-size", "2048"
    )
    values: list[float] = []
    try:
        with httpx.Client(base_url=proxy.base_url, timeout=300) as client:
            total, tokens = sums(settled(client))
            started = time.monotonic()
            with Progress() as progress:
                task = progress.add_task("requests", total=args.requests)
                for _ in range(args.requests):
                    n = int(rng.integers(10, 80))
                    start = int(rng.integers(0, len(words) - n))
                    r = client.post(
                        "/v1/chat/completions",
                        json={
                            "model": proxy.model,
                            "messages": [{"role": "user", "content": " ".join(words[start : start + n])}],
                            "max_tokens": args.max_tokens,
                            "temperature": 0.7,
                        },
                    )
                    r.raise_for_status()
                    st = settled(client)
                    t, k = sums(st)
                    if k > tokens:
                        values.append((t - total) / (k - tokens))
                    total, tokens = t, k
                    progress.advance(task)
            elapsed = time.monotonic() - started
            drift = st["drift"]
            metrics = client.get("/metrics").text
    finally:
        stop_server(proxy)
    live = {
        s: next(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("kvproxy_drift_transitions_total") and f'state="{s}"' in line
        )
        for s in ("ok", "warning", "drift")
    }
    v = np.array(values)
    print(f"\n{args.requests} requests ({len(v)} scored) on {args.cache_type} in {elapsed:.0f} s")
    print(
        f"request mean KLD: median {np.median(v):.4f}, mean {v.mean():.4f}, "
        f"log sd {np.std(np.log(v + 1e-6), ddof=1):.2f}, p99 {np.quantile(v, 0.99):.4f}"
    )
    print(f"live detector: final state {drift['state']}, transitions {live}")  # type: ignore[index]
    alarms = {WARNING: 0, DRIFT: 0}
    for _ in range(args.replay_runs):
        d = DriftDetector()
        for x in rng.choice(v, args.replay_length):
            s = d.update(float(x))
            if s in alarms:
                alarms[s] += 1
    n = args.replay_runs * args.replay_length
    print(
        f"replayed (resampled) stable run: {alarms[DRIFT]} drift, {alarms[WARNING]} warning in {n:,} requests"
    )


if __name__ == "__main__":
    main()
