"""Concurrency: a burst of N concurrent 1-token chats (shadow skipped), then idle. Every request gets
a 200 or a 503 with ``Retry-After`` (past ``--max-queue``), nothing else; RSS comes back to within
100 MiB of its level before the burst. Then fairness: a 1-token request sent 1 s into a long
generation is answered within 5 s, and the long stream's tokens keep coming.

Run it against a server that can hold the burst's connections (``--file-limit`` above ``--concurrency``)
and has a second slot for the fairness check (``--serve-args "--parallel 2"``): under the default
1,024-descriptor limit the connection cap (kvproxy.http.connections) closes connections past its ceiling
unanswered, and with one slot the short request waits for the long one, both by design.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import aiohttp
import httpx

from benchmarks.probe.common import Tally, Target, health_latency, rss_mib


async def _burst(t: Target, n: int) -> tuple[Counter[str], float]:
    headers = {"Authorization": f"Bearer {t.keys[0]}", "X-KVProxy-Shadow": "skip"}
    outcomes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

        async def one() -> None:
            try:
                async with session.post(f"{t.base_url}/v1/chat/completions", json=t.chat_body()) as resp:
                    await resp.read()
                    if resp.status == 200:
                        outcomes["200"] += 1
                    elif resp.status == 503 and resp.headers.get("Retry-After"):
                        outcomes["503 with Retry-After"] += 1
                    else:
                        outcomes[f"{resp.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return outcomes, time.monotonic() - t0


def _settled_rss(pid: int, seconds: float = 30) -> float:
    """RSS once it stops falling (or after ``seconds``)."""
    last = rss_mib(pid)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(2)
        now = rss_mib(pid)
        if abs(now - last) < 1:
            return now
        last = now
    return last


def run(t: Target, tally: Tally, n: int = 300) -> None:
    tally.part = "concurrency"
    with t.client(t.keys[0]) as http:  # warm up: the first requests allocate what every one reuses
        for _ in range(3):
            http.post("/v1/chat/completions", json=t.chat_body(), headers={"X-KVProxy-Shadow": "skip"})
    before = _settled_rss(t.pid, 10) if t.pid else None
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            health.append(health_latency(t.port, timeout=10))
            time.sleep(0.5)

    prober = threading.Thread(target=probe)
    prober.start()
    outcomes, took = asyncio.run(_burst(t, n))
    stop.set()
    prober.join()
    peak = rss_mib(t.pid) if t.pid else None
    after = _settled_rss(t.pid) if t.pid else None
    worst = max((s for _, s in health), default=0.0)
    print(
        f"  concurrency: {n} requests in {took:.1f} s: {dict(outcomes)}; RSS before {before} MiB, "
        f"after the burst {peak}, idle {after}; /health max {worst * 1000:.0f} ms"
    )
    allowed = {"200", "503 with Retry-After"}
    tally.check(
        f"{n} concurrent requests: 200 or 503 with Retry-After", set(outcomes) <= allowed, dict(outcomes)
    )
    tally.check(
        "/health within 1 s during the burst",
        worst < 1.0 and all(s == 200 for s, _ in health),
        f"{worst:.2f} s",
    )
    if before is not None and after is not None:
        tally.check(
            "RSS back within 100 MiB of its level before",
            after - before <= 100,
            f"{before:.0f} -> {after:.0f} MiB",
        )
    _fairness(t, tally)


def _fairness(t: Target, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {t.keys[0]}", "X-KVProxy-Shadow": "skip"}
    long_body: dict[str, Any] = {
        "model": t.model,
        "prompt": "Chapter 1.\n\nIt was a dark and stormy night, and",
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 7,
        "stream": True,
    }
    gaps: list[float] = []
    tokens = 0

    def long_stream() -> None:
        nonlocal tokens
        with (
            httpx.Client(base_url=t.base_url, timeout=600, headers=headers) as http,
            http.stream("POST", "/v1/completions", json=long_body) as resp,
        ):
            last = time.monotonic()
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                    tokens += 1

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    with httpx.Client(base_url=t.base_url, timeout=600, headers=headers) as http:
        short = http.post("/v1/chat/completions", json=t.chat_body())
    waited = time.monotonic() - t0
    tokens_at_answer = tokens
    streamer.join()
    print(
        f"  fairness: the short request waited {waited:.1f} s "
        f"(long stream at {tokens_at_answer} tokens, {tokens} in all)"
    )
    tally.check(
        "a 1-token request during a long generation: answered within 5 s",
        short.status_code == 200 and waited < 5,
        f"{short.status_code} after {waited:.1f} s",
    )
    tally.check(
        "the long stream keeps coming (no gap over 5 s)",
        tokens > 10 and max(gaps[1:], default=0) < 5,
        f"{tokens} tokens, max gap {max(gaps[1:], default=0):.1f} s",
    )
    status, _ = health_latency(t.port)
    tally.check("healthy after the concurrency part", status == 200, status)
