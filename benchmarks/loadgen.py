"""A load generator that stays off the proxy's core: aiohttp on uvloop, run in its own process (the
benchmark pins it beside the fake upstream). Prints one JSON line: per-request latency (to the last
byte), time to first content byte for streams, errors, wall time, and the client's own CPU time.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/v1/chat/completions --concurrency 16 \\
        --requests 2000 [--duration 5] [--stream | --mixed] [--model fake] [--warmup 50] [--check]

``--mixed`` alternates streaming and non-streaming requests; ``--check`` counts as good only a
complete answer (a JSON completion with choices; a stream whose last event is ``data: [DONE]`` and
which carries no error event; anything else is an error) and ``ok`` and ``streamed`` are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from pathlib import Path

import aiohttp
import uvloop

# every target gets the same header; only LiteLLM (which refuses to start without a key) checks it
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-kvproxy-bench-0123456789abcdef"}


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, check: bool = False
) -> tuple[float, float, bool]:
    start = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    async with session.post(url, data=body, headers=HEADERS) as resp:
        ok = resp.status == 200
        if stream:
            async for chunk in resp.content.iter_any():
                if not first and b"data: {" in chunk:
                    first = time.perf_counter() - start
                if check:
                    parts.append(chunk)
        else:
            parts.append(await resp.read())
    if ok and check:
        ok = complete(b"".join(parts), stream)
    return time.perf_counter() - start, first, ok


def complete(body: bytes, stream: bool) -> bool:
    """A whole, valid answer: a completion with choices, or a stream ending with [DONE], no error."""
    if not stream:
        try:
            return bool(json.loads(body).get("choices"))
        except ValueError:
            return False
    return body.endswith(b"data: [DONE]\n\n") and b'data: {"error"' not in body


async def run(args: argparse.Namespace) -> dict[str, object]:
    bodies = {
        stream: json.dumps(
            {
                "model": args.model,
                "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": 16,
                "stream": stream,
            }
        ).encode()
        for stream in (False, True)
    }
    sent = 0

    def next_kind() -> bool:
        """Streaming or not for the next request: --stream, or alternating with --mixed."""
        nonlocal sent
        sent += 1
        return bool(sent % 2) if args.mixed else bool(args.stream)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = streamed = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(args.warmup):
            stream = next_kind()
            await one(session, args.url, bodies[stream], stream)
        todo = args.requests
        stop_at = time.perf_counter() + args.duration
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal todo, errors, streamed
            while todo > 0 and time.perf_counter() < stop_at:
                todo -= 1
                stream = next_kind()
                streamed += stream
                try:
                    latency, first, ok = await one(session, args.url, bodies[stream], stream, args.check)
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                    continue
                if not ok:
                    errors += 1
                    continue
                latencies.append(latency)
                if stream:
                    ttfts.append(first)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "latencies": latencies,
        "ttfts": ttfts,
        "errors": errors,
        "ok": len(latencies),
        "streamed": streamed,
        "wall": wall,
        "client_cpu": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=1e9, help="stop after this many seconds")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="alternate streaming and non-streaming")
    ap.add_argument("--check", action="store_true", help="count only complete, valid answers as ok")
    ap.add_argument("--out", type=Path, help="write the JSON result here instead of stdout")
    args = ap.parse_args()
    result = json.dumps(uvloop.run(run(args)))
    if args.out:
        args.out.write_text(result)
    else:
        print(result)


if __name__ == "__main__":
    main()
