"""Misbehaving upstreams on loopback, for fault injection: real sockets, real HTTP/1.1 framing.

Every fake answers ``GET /health`` with 200 (so the proxy routes to it) and, on POSTs: ``ok`` (a
valid chat completion with logprobs), ``hang`` (reads the request, never answers), ``midstream``
(starts an SSE stream, then drops the connection), ``trickle`` (streams an event every 50 ms until
the peer goes away), ``error500`` (an upstream error), ``garbage`` (200 with a body that is not
JSON). Each records when a connection carrying a POST was closed by its peer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"connection: close\r\n\r\n"
)
CHUNK = (
    b'data: {"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}],'
    b'"object":"chat.completion.chunk","id":"x","created":0,"model":"m"}\n\n'
)


_TOP = b'{"id":42,"token":"tok","bytes":[116,111,107],"logprob":-0.1}'
_ENTRY = (
    b'{"id":42,"token":"tok","bytes":[116,111,107],"logprob":-0.1,"top_logprobs":['
    + _TOP
    + b',{"id":7,"token":"x","bytes":[120],"logprob":-2.5}]}'
)
OK_BODY = (
    b'{"choices":[{"index":0,"finish_reason":"length","message":{"role":"assistant","content":"toktok"},'
    b'"logprobs":{"content":[' + _ENTRY + b"," + _ENTRY + b']}}],"object":"chat.completion","id":"x",'
    b'"created":0,"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)


def _response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n".encode()
        + b"content-type: "
        + ctype
        + b"\r\nconnection: keep-alive\r\n\r\n"
        + body
    )


@dataclass
class FaultServer:
    mode: str
    url: str = ""
    posts: int = 0
    closed_at: list[float] = field(default_factory=list)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    if length:
        await reader.readexactly(length)
    return method, path


async def _handle(server: FaultServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                req = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if req is None:
                return
            method, path = req
            if method == "GET":
                writer.write(
                    _response("200 OK", b'{"status":"ok"}')
                    if path == "/health"
                    else _response("404 Not Found", b'{"error":"not found"}')
                )
                await writer.drain()
                continue
            server.posts += 1
            if server.mode == "hang":
                await reader.read()  # until the peer closes
                server.closed_at.append(time.monotonic())
                return
            if server.mode == "midstream":
                writer.write(SSE_HEAD + CHUNK)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.transport.abort()
                return
            if server.mode == "trickle":
                writer.write(SSE_HEAD)
                try:
                    while True:
                        writer.write(CHUNK)
                        await writer.drain()
                        await asyncio.sleep(0.05)
                except ConnectionError:
                    server.closed_at.append(time.monotonic())
                    return
            if server.mode == "ok":  # a well-behaved chat completion, with logprobs and token ids
                writer.write(_response("200 OK", OK_BODY))
                await writer.drain()
                continue
            if server.mode == "error500":
                writer.write(
                    _response(
                        "500 Internal Server Error",
                        b'{"error":{"code":500,"message":"boom","type":"server_error"}}',
                    )
                )
            elif server.mode == "garbage":
                writer.write(_response("200 OK", b"this is { not json"))
            await writer.drain()
    finally:
        writer.close()


@contextmanager
def fault_server(mode: str, port: int = 0) -> Iterator[FaultServer]:
    """Run one fake upstream in a thread on a loopback port (a free one by default)."""
    server = FaultServer(mode)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        srv = await asyncio.start_server(
            lambda r, w: _handle(server, r, w), "127.0.0.1", port, reuse_address=True
        )
        server.url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        started.set()
        await stop.wait()
        srv.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await srv.wait_closed()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
