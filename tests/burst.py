"""Bursts of concurrent 1-token chats against a running ``kvproxy serve``, and the RSS they leave.

Used by tests/test_embedded_load.py (300 requests in CI) and benchmarks/embedded_burst.py (the docs'
1,500). Each request is its own connection (aiohttp, no client timeout) and skips shadow scoring.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import RunningServer


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    """Samples a process's RSS every 100 ms on a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def chat_body(model: str, i: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Say one word about the number {i}."}],
            "max_tokens": 1,
            "temperature": 0,
        }
    ).encode()


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        async with session.post(
            url, data=body, headers={"content-type": "application/json", "X-KVProxy-Shadow": "skip"}
        ) as resp:
            payload = await resp.json(content_type=None)
            out: dict[str, Any] = {"status": resp.status, "seconds": time.perf_counter() - start}
            if resp.status == 503:
                err = payload.get("error", {}) if isinstance(payload, dict) else {}
                out["retry_after"] = resp.headers.get("Retry-After")
                out["openai_shape"] = {"message", "type", "param", "code"} <= set(err)
                out["code"] = err.get("code")
            return out
    except aiohttp.ClientError as exc:
        return {"status": f"client error: {type(exc).__name__}", "seconds": time.perf_counter() - start}


async def burst(base_url: str, model: str, n: int) -> list[dict[str, Any]]:
    url = f"{base_url}/v1/chat/completions"
    # one connection a request (as many clients would be), none of them timed out by the client
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        return await asyncio.gather(*(one(session, url, chat_body(model, i)) for i in range(n)))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_burst(server: RunningServer, n: int, idle: float) -> dict[str, Any]:
    """Warm up, then the burst and the idle; the figures as a dict."""
    pid = server.process.pid
    asyncio.run(burst(server.base_url, server.model, 4))  # first requests allocate what all reuse
    time.sleep(1)
    before = rss_mib(pid)
    peak = PeakRss(pid)
    start = time.perf_counter()
    answers = asyncio.run(burst(server.base_url, server.model, n))
    wall = time.perf_counter() - start
    time.sleep(idle)
    top = peak.stop()
    after = rss_mib(pid)
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
    busy = [a for a in answers if a["status"] == 503]
    ok = [a["seconds"] for a in answers if a["status"] == 200]
    return {
        "requests": n,
        "statuses": statuses,
        "busy_with_retry_after": sum(1 for a in busy if (a.get("retry_after") or "").isdigit()),
        "busy_openai_shape": sum(1 for a in busy if a.get("openai_shape")),
        "busy_codes": sorted({str(a.get("code")) for a in busy}),
        "wall_s": round(wall, 1),
        "ok_p50_s": percentile(ok, 0.5),
        "ok_p99_s": percentile(ok, 0.99),
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(top, 1),
        "rss_after_mib": round(after, 1),
        "rss_growth_mib": round(after - before, 1),
    }
