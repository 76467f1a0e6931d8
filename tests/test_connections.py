"""Connection hygiene (kvproxy.http.connections): header and body deadlines, the cap on open connections,
and /health answering while slow clients try to use up the process's file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from kvproxy.http.connections import ConnectionLimits, connection_budget, guarded_protocol
from tests.conftest import start_server, stop_server

KEY, OTHER_KEY, ADMIN = "probe-key-1", "probe-key-2", "probe-admin"


# ---- the budget ---------------------------------------------------------------------------------


def test_the_cap_leaves_descriptors_for_the_process() -> None:
    limits = connection_budget(1024)
    assert limits.max_connections < limits.ceiling < 1024 - 63
    proxy = connection_budget(1024, upstream=512)  # two upstream replicas' pools
    assert proxy.ceiling <= 1024 - 64 - 512
    assert connection_budget(10**6).max_connections == 16384
    assert connection_budget(1024, asked=100).max_connections == 100
    with pytest.raises(ValueError, match="open-file limit"):
        connection_budget(1024, asked=5000)
    with pytest.raises(ValueError, match="raise it"):
        connection_budget(64)


# ---- deadlines and the cap, on a small app under the guarded protocol -------------------------


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """/health at once; /slow after 3 s; anything with a body reads it all first."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/refuse":  # answers before reading the body (as a 401 does)
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["method"] == "POST":
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(3)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def guarded_server(limits: ConnectionLimits) -> Iterator[tuple[int, list[str]]]:
    closed: list[str] = []
    config = uvicorn.Config(_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    config.http = guarded_protocol(limits, closed.append)  # type: ignore[assignment]
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield srv.servers[0].sockets[0].getsockname()[1], closed
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or 10 s)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _read_head(sock: socket.socket) -> bytes:
    """A response's head (lower-cased) and its body read off by ``content-length``; b"" if the
    server closed the connection instead."""
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head = head.lower()
    length = next((int(h[15:]) for h in head.split(b"\r\n") if h.startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return head


def test_header_and_body_deadlines() -> None:
    limits = ConnectionLimits(max_connections=50, ceiling=60, header_timeout=1.0, body_timeout=1.5)
    with guarded_server(limits) as (port, closed):
        silent, partial, body = _connect(port), _connect(port), _connect(port)
        start = time.monotonic()
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        body.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        assert _read_all(silent) == b""  # nothing sent: closed without a word
        late = _read_all(partial)
        assert late.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in late
        assert 0.9 < time.monotonic() - start < 3
        late_body = _read_all(body)
        assert late_body.startswith(b"HTTP/1.1 408 ") and b"body" in late_body
        assert 1.4 < time.monotonic() - start < 4
        # a kept-alive connection is on the header deadline again after each response
        kept = _connect(port)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\n")
        assert _read_all(kept).count(b"HTTP/1.1 ") == 2  # the answer, then the 408 for the second
        # answered before the body is in: closed at once, not read on
        early = _connect(port)
        early.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        t0 = time.monotonic()
        assert _read_all(early).startswith(b"HTTP/1.1 401 ")
        assert time.monotonic() - t0 < 0.5
    assert sorted(set(closed)) == ["body_timeout", "header_timeout", "unread_body"]


def test_an_answer_before_the_body_says_connection_close() -> None:
    """Issue 25, finding 12: a 401 sent before the body was read closed the connection without
    saying so, and a keep-alive client's next request hit a closed socket."""
    limits = ConnectionLimits(max_connections=50, ceiling=60, header_timeout=5.0, body_timeout=5.0)
    with guarded_server(limits) as (port, closed):
        # a keep-alive client as HTTP/1.1 has it: it reuses the socket unless told `close`
        sock = _connect(port)
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx")
        head = _read_head(sock)
        assert head.startswith(b"http/1.1 401 ")
        if b"\r\nconnection: close" in head:
            sock.close()
            sock = _connect(port)
        with contextlib.suppress(OSError):  # a write into a socket the server closed may fail
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_head(sock).startswith(b"http/1.1 200 "), "the next request got no answer"
        sock.close()
        # a whole body answered as usual keeps its connection: two answers on one socket
        kept = _connect(port)
        kept.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nxx" * 2)
        time.sleep(0.5)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        both = _read_all(kept)
        assert both.count(b"HTTP/1.1 401 ") == 2 and b"HTTP/1.1 200 " in both, both
        assert b"connection: close" not in both.split(b"HTTP/1.1 200 ")[0].lower()
        # an httpx client with keep-alive: a body refused while it is still being sent, then more
        # requests on the same client, every one answered
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(3):
                refused = client.post("/refuse", content=b"x" * (8 << 20))
                assert refused.status_code == 401
                assert refused.headers.get("connection") == "close"
                assert client.get("/health").text == "ok"
    assert "unread_body" in closed


def test_a_pipelined_request_is_timed_from_when_it_starts() -> None:
    """Its body is not read while the request before it runs (uvicorn pauses reading), so its
    deadline starts with it: the long first answer is not cut, the slow second body still is."""
    limits = ConnectionLimits(max_connections=50, ceiling=60, header_timeout=1.0, body_timeout=1.5)
    with guarded_server(limits) as (port, closed):
        sock = _connect(port)
        sock.sendall(
            b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        t0 = time.monotonic()
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\n\r\nok" in answer, answer[:200]
        assert answer.count(b"HTTP/1.1 408 ") == 1
        assert 3 + 1.4 < time.monotonic() - t0 < 8
    assert closed == ["body_timeout"]


def test_the_cap_evicts_slow_senders_then_refuses_with_503() -> None:
    limits = ConnectionLimits(max_connections=4, ceiling=6, header_timeout=30, body_timeout=30)
    with guarded_server(limits) as (port, closed):
        slow = [_connect(port) for _ in range(4)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)
        # the cap is full of slow senders: a new client takes the oldest one's place
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert client.get("/health").status_code == 200
        assert _read_all(slow[0]) == b"" and closed.count("evicted") >= 1
        # the cap full of busy requests: others are refused with 503 and Retry-After, /health served
        busy = [_connect(port) for _ in range(4)]
        for b in busy:
            b.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            refused = client.post("/v1/chat/completions", json={})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert client.get("/health").status_code == 200
        assert "over_cap" in closed
        for b in busy:
            assert _read_all(b).startswith(b"HTTP/1.1 200 ")


# ---- the slowloris test, against a real kvproxy under a 1,024-descriptor limit ----------------


SLOW = 1100
FILE_LIMIT = 1024


async def _slow_client(port: int, kind: str, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """One connection that sends its request a piece every 5 s: headers, or a body."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats["connect_failed"] += 1
        return
    stats[f"{kind}_opened"] += 1
    if kind == "headers":
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    else:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
    try:
        while not stop.is_set():
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(reader.read(4096), timeout=5)
                if not data:  # the server closed it
                    stats[f"{kind}_closed"] += 1
                    return
            writer.write(b"X-Slow: 1\r\n" if kind == "headers" else b" ")
    except OSError:
        stats[f"{kind}_closed"] += 1
    finally:
        writer.close()


def _probe_health(port: int, seconds: float, latencies: list[float], statuses: list[int]) -> None:
    """/health on a fresh connection every 0.2 s, from a thread of its own (blocking sockets), so a
    busy client loop does not count as the server's delay."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        status = 0
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = sock.recv(4096)
            status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        latencies.append(time.monotonic() - t0)
        statuses.append(status)
        time.sleep(0.2)


async def _slowloris(port: int, seconds: float) -> tuple[list[float], list[int], dict[str, int]]:
    stop = asyncio.Event()
    stats = dict.fromkeys(["headers_opened", "body_opened", "headers_closed", "body_closed"], 0)
    stats["connect_failed"] = 0
    latencies: list[float] = []
    statuses: list[int] = []
    prober = threading.Thread(target=_probe_health, args=(port, seconds, latencies, statuses))
    prober.start()
    kinds = ["headers" if i % 2 else "body" for i in range(SLOW)]
    clients = [asyncio.create_task(_slow_client(port, kind, stop, stats)) for kind in kinds]
    await asyncio.to_thread(prober.join)
    stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    return latencies, statuses, stats


@pytest.fixture(scope="module")
def limited_server() -> Iterator[Any]:
    env = {"KVPROXY_API_KEYS": f"{KEY},{OTHER_KEY}", "KVPROXY_ADMIN_TOKEN": ADMIN}
    srv = start_server("--ctx-size", "1024", env=env, file_limit=FILE_LIMIT)
    yield srv
    stop_server(srv)


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_health_answers_within_a_second_through_1100_slow_connections(limited_server: Any) -> None:
    """Issue 20, finding 5: about 1,020 connections with unfinished headers made /health refuse
    connections under a 1,024-descriptor limit, and 3,000 slow ones were still open after 33 s."""
    port = int(limited_server.base_url.rsplit(":", 1)[1])
    pid = limited_server.process.pid
    idle = _open_descriptors(pid)
    latencies, statuses, stats = asyncio.run(_slowloris(port, seconds=15))
    print(
        f"\n{SLOW} slow connections under a {FILE_LIMIT} file limit: "
        f"/health max {max(latencies) * 1000:.0f} ms, "
        f"p50 {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms over {len(latencies)} probes; "
        f"{stats}; descriptors idle {idle}"
    )
    assert statuses and all(s == 200 for s in statuses), statuses
    assert max(latencies) < 1.0, max(latencies)
    assert stats["connect_failed"] == 0
    assert stats["headers_closed"] == stats["headers_opened"] == SLOW // 2  # the 10 s header deadline
    assert stats["body_closed"] >= 100  # evicted at the cap (the others: the 60 s body deadline)
    # the server serves as before, and says what it closed
    with httpx.Client(base_url=limited_server.base_url, timeout=60) as client:
        ok = client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={
                "model": limited_server.model,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
            },
        )
        assert ok.status_code == 200, ok.text
        text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert 'kvproxy_connections_closed_total{reason="evicted"}' in text
    assert _open_descriptors(pid) < idle + 20
