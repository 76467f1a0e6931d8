"""Slow clients: headers or bodies a piece every 5 s, connections that send nothing, a stream nobody
reads. /health answers within a second throughout, every slow connection is closed by the server
within its deadline (10 s for headers, 60 s for bodies, or sooner at the connection cap), and the
server's open files stay under its limit."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

from benchmarks.probe.common import Tally, Target, health_latency, open_files

PIECE_EVERY = 5.0


async def _slow(port: int, kind: str, key: str, stop: asyncio.Event, closed_after: list[float]) -> None:
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed_after.append(-1.0)
        return
    if kind == "headers":
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: probe\r\n")
    elif kind == "body":
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
    elif kind == "unauthenticated body":
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{"
        )
    # "idle": nothing at all
    try:
        while not stop.is_set():
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if not await asyncio.wait_for(reader.read(65536), timeout=PIECE_EVERY) and reader.at_eof():
                    closed_after.append(time.monotonic() - t0)
                    return
            if kind == "headers":
                writer.write(b"X-Slow: 1\r\n")
            elif kind != "idle":
                writer.write(b" ")
        closed_after.append(float("inf"))  # still open when the probe stopped
    except OSError:
        closed_after.append(time.monotonic() - t0)
    finally:
        writer.close()


def _probe(port: int, seconds: float, out: list[tuple[int, float]]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(health_latency(port))
        time.sleep(0.2)


async def _wave(
    t: Target, counts: dict[str, int], seconds: float
) -> tuple[list[tuple[int, float]], dict[str, list[float]]]:
    stop = asyncio.Event()
    closed: dict[str, list[float]] = {kind: [] for kind in counts}
    health: list[tuple[int, float]] = []
    prober = threading.Thread(target=_probe, args=(t.port, seconds, health))
    prober.start()
    tasks = [
        asyncio.create_task(_slow(t.port, kind, t.keys[0], stop, closed[kind]))
        for kind, n in counts.items()
        for _ in range(n)
    ]
    await asyncio.to_thread(prober.join)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return health, closed


def run(t: Target, tally: Tally, connections: int = 1100) -> None:
    tally.part = "slow"
    files_before = open_files(t.pid) if t.pid else None
    quarter = connections // 4
    counts = {
        "headers": connections - 3 * quarter,
        "body": quarter,
        "unauthenticated body": quarter,
        "idle": quarter,
    }
    peak_files = 0
    stop_watch = threading.Event()

    def watch_files() -> None:
        nonlocal peak_files
        while t.pid and not stop_watch.is_set():
            with contextlib.suppress(OSError):
                peak_files = max(peak_files, open_files(t.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_files, daemon=True)
    watcher.start()
    health, closed = asyncio.run(_wave(t, counts, seconds=75))
    stop_watch.set()
    latencies = [s for _, s in health]
    print(
        f"  slow: {connections} connections {counts}; /health max {max(latencies) * 1000:.0f} ms over "
        f"{len(health)} probes; open files peak {peak_files} (before {files_before})"
    )
    tally.check("/health answers 200 throughout", all(status == 200 for status, _ in health), health[:5])
    tally.check("/health within 1 s throughout", max(latencies) < 1.0, f"max {max(latencies):.2f} s")
    for kind, deadline in (("headers", 10), ("idle", 10), ("unauthenticated body", 1), ("body", 60)):
        times = closed[kind]
        late = [x for x in times if x > deadline + PIECE_EVERY + 2 or x < 0]
        tally.check(
            f"slow {kind}: closed by the server within {deadline} s",
            len(times) == counts[kind] and not late,
            f"{len(late)} late or never of {len(times)}; slowest {max(times, default=0):.1f} s",
        )
    if t.pid:
        tally.check("open files stay under the limit", peak_files < 1024, peak_files)
    _unread_stream(t, tally)


def _unread_stream(t: Target, tally: Tally) -> None:
    """A stream whose client reads nothing for 10 s: the server stays responsive, then serves on."""
    body = (
        b'{"model": "%s", "stream": true, "max_tokens": 200, '
        b'"messages": [{"role": "user", "content": "Tell a story."}]}' % t.model.encode()
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: probe\r\nAuthorization: Bearer "
        + t.keys[0].encode()
        + b"\r\nX-KVProxy-Shadow: skip\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    with socket.create_connection(("127.0.0.1", t.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        worst = max(health_latency(t.port)[1] for _ in range(20) if not time.sleep(0.5))
    tally.check("/health within 1 s beside an unread stream", worst < 1.0, f"{worst:.2f} s")
    status, _ = health_latency(t.port)
    tally.check("serves on after the unread stream is dropped", status == 200, status)
