"""Throughput, time to first token and fairness of the embedded server at ``--parallel`` 1, 2, 4.

    .venv/bin/python benchmarks/embedded_parallel.py [--parallel 1 2 4] [--clients 8] [--requests 32]
        [--tokens 48] [--n-gpu-layers N] [--fairness] [--long-tokens 4000] [--cache-type q4_0]

Runs unchanged on a GPU (``--n-gpu-layers -1``). For each N it starts ``kvproxy serve --parallel N``
(shadow scoring off: this measures serving) and:

* **throughput**: ``--clients`` clients, each sending streamed ``/v1/completions`` one after the other
  (``--requests`` in all; English prompts of 40 to 200 words, greedy, ``max_tokens`` ``--tokens``);
  reports completion tokens per second over the wall time, the time to first token (first content
  chunk) at p50 and p99, and request latency at p50 and p99;
* **fairness** (``--fairness``): one client streams a ``--long-tokens`` completion; once it is
  running, a 1-token chat is sent; reports how long that took (or the 503 it got at ``--parallel 1``
  once the queue deadline passed) and the long stream's tokens per second before and after.

Prints one JSON line per measurement and markdown tables at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from kvproxy.corpus import english_text
from tests.conftest import RunningServer, start_server, stop_server

LONG_PROMPT = (
    "Chapter 1\n\nThe old lighthouse keeper had kept a journal for forty years. On the first page he wrote"
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def prompt_text(i: int) -> str:
    words = english_text().split()
    n = 40 + (i * 37) % 161
    start = (i * 211) % (len(words) - n)
    return " ".join(words[start : start + n])


async def stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], on_token: Any = None
) -> dict[str, Any]:
    """One streamed request: first-token time, total time, completion tokens (from the usage)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(
        url, json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        if r.status != 200:
            return {"status": r.status, "seconds": time.perf_counter() - start, "body": await r.text()}
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                obj = json.loads(data)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                choices = obj.get("choices") or []
                if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                    if first is None:
                        first = time.perf_counter() - start
                    if on_token is not None:
                        on_token()
    return {"status": 200, "ttft": first, "seconds": time.perf_counter() - start, "tokens": tokens}


async def throughput(server: RunningServer, args: argparse.Namespace) -> dict[str, Any]:
    url = f"{server.v1}/completions"
    queue = list(range(args.requests))
    results: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # warm-up: one request, not counted
        await stream(session, url, {"model": server.model, "prompt": "Hello", "max_tokens": 4})

        async def client() -> None:
            while queue:
                i = queue.pop(0)
                body = {
                    "model": server.model,
                    "prompt": prompt_text(i),
                    "max_tokens": args.tokens,
                    "temperature": 0,
                }
                results.append(await stream(session, url, body))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    total = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "completion_tokens": total,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(total / wall, 2),
        "ttft_p50_s": round(pct(ttft, 0.5), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "latency_p50_s": round(pct([r["seconds"] for r in ok], 0.5), 3),
        "latency_p99_s": round(pct([r["seconds"] for r in ok], 0.99), 3),
    }


async def fairness(server: RunningServer, args: argparse.Namespace) -> dict[str, Any]:
    times: list[float] = []
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = {
            "model": server.model,
            "prompt": LONG_PROMPT,
            "max_tokens": args.long_tokens,
            "temperature": 0,
        }
        long = asyncio.create_task(
            stream(session, f"{server.v1}/completions", body, lambda: times.append(time.monotonic()))
        )
        while len(times) < 10:
            if long.done():
                raise RuntimeError(f"the long stream ended early: {long.result()}")
            await asyncio.sleep(0.05)
        sent = time.monotonic()
        before_rate = (len(times) - 1) / (times[-1] - times[0])
        short = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        async with session.post(f"{server.v1}/chat/completions", json=short) as r:
            status = r.status
            retry_after = r.headers.get("Retry-After")
            await r.read()
        answered = time.monotonic()
        await asyncio.sleep(5)
        after = [t for t in times if t > answered]
        long.cancel()
    return {
        "short_status": status,
        "short_seconds": round(answered - sent, 2),
        "short_retry_after": retry_after,
        "long_tokens_per_s_before": round(before_rate, 2),
        "long_tokens_during_short": sum(1 for t in times if sent < t <= answered),
        "long_tokens_per_s_after": round(len(after) / 5, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--cache-type", default="q4_0")
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fairness", action="store_true")
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    table: list[dict[str, Any]] = []
    for n in args.parallel:
        flags = ["--parallel", str(n), "--shadow-rate", "0", "--ctx-size", str(args.ctx_size)]
        flags += ["-ctk", args.cache_type, "-ctv", args.cache_type, "--max-queue", str(args.requests)]
        if args.n_gpu_layers is not None:
            flags += ["--n-gpu-layers", str(args.n_gpu_layers)]
        if args.threads is not None:
            flags += ["--threads", str(args.threads)]
        server = start_server(*flags)
        row: dict[str, Any] = {"parallel": n}
        try:
            if not args.skip_throughput:
                row.update(asyncio.run(throughput(server, args)))
            if args.fairness:
                row["fairness"] = asyncio.run(fairness(server, args))
        finally:
            stop_server(server)
        print(json.dumps(row), flush=True)
        table.append(row)
    if not args.skip_throughput:
        print(f"\n{args.clients} clients, {args.requests} streamed requests of {args.tokens} tokens")
        print("| --parallel | tokens/s | TTFT p50 | TTFT p99 | latency p50 | latency p99 |")
        print("|---|---|---|---|---|---|")
        for r in table:
            print(
                f"| {r['parallel']} | {r['tokens_per_s']} | {r['ttft_p50_s']} s | {r['ttft_p99_s']} s | "
                f"{r['latency_p50_s']} s | {r['latency_p99_s']} s |"
            )
    if args.fairness:
        print(f"\n1-token chat sent during a {args.long_tokens}-token stream")
        print("| --parallel | short request | long stream tokens/s before | after |")
        print("|---|---|---|---|")
        for r in table:
            f = r["fairness"]
            what = f"{f['short_seconds']} s" + ("" if f["short_status"] == 200 else f" ({f['short_status']})")
            rates = f"{f['long_tokens_per_s_before']} | {f['long_tokens_per_s_after']}"
            print(f"| {r['parallel']} | {what} | {rates} |")


if __name__ == "__main__":
    main()
