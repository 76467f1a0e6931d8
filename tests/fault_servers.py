"""Misbehaving upstreams on loopback, for fault injection: real sockets, real HTTP/1.1 framing.

Every fake answers ``GET /health`` with 200 (so the proxy routes to it) and, on POSTs: ``ok`` (a
valid chat completion with logprobs), ``hang`` (reads the request, never answers), ``midstream``
(starts an SSE stream, then drops the connection), ``error500`` (an upstream error), ``garbage``
(200 with a body that is not JSON). Each records when a connection carrying a POST was closed by
its peer.

:func:`llama_fake` is a route-aware fake llama-server (chat completions streamed or not, logprobs and
the usage chunk only when asked, ``/apply-template``, ``/tokenize``, per-position ``/completion``)
whose fault can be switched at run time and applies only to the routes named: the primary's chat
route, or the reference's scoring route. It counts open connections and those it is still answering,
for the leak checks. With ``score_route`` it is a kvproxy scoring server too: ``/kvproxy/v1/info``,
``/kvproxy/v1/score`` and a what-if (``/kvproxy/v1/what-if``: a body the test sets, or a fault of
its own, ``what_if_fault``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

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
    method, path, _ = await _read_full_request(reader)
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


# ---- a route-aware fake llama-server with switchable faults -----------------------------------------

CHAT_PATH = "/v1/chat/completions"
SCORE_PATH = "/completion"  # what a plain llama-server reference is asked, once per position
EXACT_SCORE_PATH = "/kvproxy/v1/score"  # what a kvproxy scoring server is asked, once per job
WHAT_IF_PATH = "/kvproxy/v1/what-if"  # a kvproxy scoring server's live what-if (GET, polled)
WHAT_IF_FAULTS = ("slow", "huge", "error401")
SCORE_INFO = {
    "score": True,
    "model": "m",
    "primary": {"cache_type_k": "q4_0", "cache_type_v": "q4_0"},
    "reference": {"cache_type_k": "f16", "cache_type_v": "f16"},
}
TOKEN_IDS = (1000, 1001, 1002)
FAULTS = (
    "refuse",  # nothing listens on the port (open connections are cut too)
    "hang",  # reads the request, never answers
    "slow",  # answers after `delay` seconds
    "drip",  # headers at once, then one byte every `delay` seconds (past any sane deadline)
    "midstream",  # half the answer, then the connection is reset
    "nodone",  # a stream that ends cleanly without `data: [DONE]`
    "badjson",  # a body (or one SSE `data:` line) that is not JSON
    "error400",
    "error429",
    "error500",
    "error503",
    "lpcount",  # one logprob entry short of the generated tokens
    "lpids",  # logprob entries without token ids
    "errorobj",  # 200 with an error object for a body (a stream gets it as JSON, not events)
    "status201",  # a good answer with a status other than 200
    "huge",  # a body (or one SSE line) of `huge` bytes, written in pieces until the peer stops reading
)
ERROR_OBJECT = b'{"error":{"code":500,"message":"it went wrong","type":"server_error"}}'

ERRORS = {
    "error400": (
        "400 Bad Request",
        b'{"error":{"code":400,"message":"bad thing","type":"invalid_request_error"}}',
    ),
    "error429": (
        "429 Too Many Requests",
        b'{"error":{"code":429,"message":"slow down","type":"rate_limit_error"}}',
    ),
    "error500": (
        "500 Internal Server Error",
        b'{"error":{"code":500,"message":"boom","type":"server_error"}}',
    ),
    "error503": (
        "503 Service Unavailable",
        b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
    ),
}


@dataclass
class LlamaFake:
    """State of one fake llama-server; the counters are read by tests from another thread."""

    fault: str | None = None
    fault_paths: frozenset[str] = frozenset({CHAT_PATH, SCORE_PATH, EXACT_SCORE_PATH})
    delay: float = 0.2
    score_route: bool = False  # also a kvproxy scoring server (GET /kvproxy/v1/info answers)
    # with score_route, GET /kvproxy/v1/what-if answers this body, or the fault (WHAT_IF_FAULTS)
    what_if_body: bytes = b'{"deployments":[]}'
    what_if_fault: str | None = None
    what_if_gets: int = 0
    newline: bytes = b"\n"  # SSE line end: LF as llama-server sends, CRLF as sse-starlette, or CR
    pace: float = 0.0  # seconds between streamed events (0: the whole stream in one write)
    huge: int = 64 << 20  # bytes a `huge` answer offers
    huge_sent: int = 0  # bytes of `huge` answers the peer took before it stopped reading
    url: str = ""
    port: int = 0
    posts: dict[str, int] = field(default_factory=dict)
    open: int = 0  # connections open now
    busy: int = 0  # connections in the middle of answering a POST
    closed_at: list[float] = field(default_factory=list)  # a peer closed while we still answered
    loop: asyncio.AbstractEventLoop | None = None
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def set_fault(self, fault: str | None, paths: frozenset[str] | None = None) -> None:
        """Switch the fault (None: behave), from the test's thread; ``refuse`` stops listening."""
        assert fault is None or fault in FAULTS, fault
        assert self.loop is not None
        if paths is not None:
            self.fault_paths = paths
        asyncio.run_coroutine_threadsafe(self._switch(fault), self.loop).result(10)

    async def _switch(self, fault: str | None) -> None:
        if fault == "refuse" and self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            await self.server.wait_closed()
            self.server = None
        elif fault != "refuse" and self.server is None:
            await self.listen()
        self.fault = fault

    async def listen(self) -> None:
        self.server = await asyncio.start_server(
            lambda r, w: _serve_llama(self, r, w), "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"


def _json(status: str, payload: object) -> bytes:
    return _response(status, orjson.dumps(payload))


def _entry(i: int, top: int, *, ids: bool = True) -> dict[str, object]:
    tok = f" w{i}"
    tops = [
        {"id": TOKEN_IDS[i] + j, "token": tok, "bytes": list(tok.encode()), "logprob": -0.1 - j}
        for j in range(top)
    ]
    entry: dict[str, object] = {
        "id": TOKEN_IDS[i],
        "token": tok,
        "bytes": list(tok.encode()),
        "logprob": -0.1,
        "top_logprobs": tops,
    }
    if not ids:
        entry.pop("id")
        for t in tops:
            t.pop("id")
    return entry


def _entries(req: dict[str, Any], fault: str | None) -> list[dict[str, object]] | None:
    """The logprob entries llama-server would send (None when not asked), faulted if told."""
    if not req.get("logprobs"):
        return None
    top = int(req.get("top_logprobs") or 0)
    entries = [_entry(i, top, ids=fault != "lpids") for i in range(len(TOKEN_IDS))]
    return entries[:-1] if fault == "lpcount" else entries


def chat_body(req: dict[str, Any], fault: str | None = None) -> bytes:
    """A llama-server chat completion: ``logprobs`` only when asked (as llama-server does)."""
    choice: dict[str, object] = {"finish_reason": "length", "index": 0}
    entries = _entries(req, fault)
    if entries is not None:
        choice["logprobs"] = {"content": entries}
    choice["message"] = {"role": "assistant", "content": "".join(f" w{i}" for i in range(len(TOKEN_IDS)))}
    n = len(TOKEN_IDS)
    return orjson.dumps(
        {
            "choices": [choice],
            "created": 1,
            "model": "m",
            "object": "chat.completion",
            "usage": {"completion_tokens": n, "prompt_tokens": 3, "total_tokens": 3 + n},
            "id": "chatcmpl-fake",
        }
    )


def chat_events(req: dict[str, Any], fault: str | None = None, newline: bytes = b"\n") -> list[bytes]:
    """A llama-server chat stream: logprobs per chunk and the usage chunk only when asked; lines end
    in ``newline``."""
    entries = _entries(req, fault)
    head = {"created": 1, "id": "chatcmpl-fake", "model": "m", "object": "chat.completion.chunk"}
    events: list[dict[str, object]] = []
    for i in range(len(TOKEN_IDS)):
        choice: dict[str, object] = {"finish_reason": None, "index": 0, "delta": {"content": f" w{i}"}}
        if entries is not None and i < len(entries):
            choice["logprobs"] = {"content": [entries[i]]}
        events.append({"choices": [choice], **head})
    events.append({"choices": [{"finish_reason": "length", "index": 0, "delta": {}}], **head})
    n = len(TOKEN_IDS)
    if (req.get("stream_options") or {}).get("include_usage"):
        usage = {"completion_tokens": n, "prompt_tokens": 3, "total_tokens": 3 + n}
        events.append({"choices": [], **head, "usage": usage})
    events[-1]["timings"] = {"prompt_n": 3, "predicted_n": n}  # llama-server's, on the last chunk
    end = newline * 2
    out = [b"data: " + orjson.dumps(e) + end for e in events]
    if fault == "badjson":
        out[1] = b"data: {not json" + end
    if fault != "nodone":
        out.append(b"data: [DONE]" + end)
    return out


def position_body(req: dict[str, Any], fault: str | None = None) -> bytes:
    """Per-position top-K, as llama-server's ``/completion`` with ``n_probs`` answers it: one object
    for one prompt, a list (with ``index``) for an array of token prompts."""
    prompts = req.get("prompt")
    batch = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], list)
    if fault == "lpcount":  # positions without a top-K
        empty: dict[str, object] = {"completion_probabilities": []}
        return orjson.dumps([{"index": i, **empty} for i in range(len(prompts))] if batch else empty)
    k = int(req.get("n_probs") or 1)
    tops: list[dict[str, object]] = [
        {"id": TOKEN_IDS[0] + j, "token": f" w{j}", "logprob": -0.12 - j} for j in range(k)
    ]
    if fault == "lpids":
        for t in tops:
            t.pop("id")
    one: dict[str, object] = {"completion_probabilities": [{"top_logprobs": tops}]}
    return orjson.dumps([{"index": i, **one} for i in range(len(prompts))] if batch else one)


def exact_scores_body(req: dict[str, Any], fault: str | None = None) -> bytes:
    """A kvproxy scoring server's answer: one score per generated token (one short if faulted)."""
    n = len(req["token_ids"])
    n -= fault == "lpcount"
    return orjson.dumps(
        {
            "kld": [0.01] * n,
            "same_top": [True] * n,
            "p_ref": [0.9] * n,
            "p_primary": [0.88] * n,
            "check_logprobs": [[-0.1 - j for j in range(len(ids))] for ids in req.get("check_ids") or []][:n],
        }
    )


SSE_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _read_full_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    return method, path, (await reader.readexactly(length)) if length else b""


async def _serve_llama(fake: LlamaFake, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    fake.open += 1
    fake.writers.add(writer)
    try:
        while True:
            try:
                method, path, body = await _read_full_request(reader)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            if method == "GET":
                if path == "/health":
                    writer.write(_json("200 OK", {"status": "ok"}))
                elif path == "/kvproxy/v1/info" and fake.score_route:
                    writer.write(_json("200 OK", SCORE_INFO))
                elif path == WHAT_IF_PATH and fake.score_route:
                    try:
                        if not await _what_if(fake, writer):
                            return
                    except ConnectionError:  # the proxy gave up on a slow or huge answer
                        return
                    continue
                else:
                    writer.write(_json("404 Not Found", {"error": "no"}))
                await writer.drain()
                continue
            fake.posts[path] = fake.posts.get(path, 0) + 1
            fault = fake.fault if path in fake.fault_paths else None
            fake.busy += 1
            try:
                keep = await _answer(fake, fault, path, orjson.loads(body), reader, writer)
            except ConnectionError:
                fake.closed_at.append(time.monotonic())
                return
            finally:
                fake.busy -= 1
            if not keep:
                return
    except asyncio.CancelledError:
        return  # the fake is stopping (swallowed: 3.11's start_server logs a cancelled handler)
    finally:
        fake.open -= 1
        fake.writers.discard(writer)
        writer.close()


async def _what_if(fake: LlamaFake, writer: asyncio.StreamWriter) -> bool:
    """A fake scoring server's what-if (its body, or its fault); False when the connection is done."""
    fake.what_if_gets += 1
    fault = fake.what_if_fault
    assert fault is None or fault in WHAT_IF_FAULTS, fault
    if fault == "slow":
        await asyncio.sleep(fake.delay)
    if fault == "huge":
        await _huge(fake, writer, stream=False)
        return False
    if fault == "error401":
        writer.write(_json("401 Unauthorized", {"error": {"code": 401, "message": "Incorrect admin token"}}))
    else:
        writer.write(_response("200 OK", fake.what_if_body))
    await writer.drain()
    return True


async def _answer(
    fake: LlamaFake,
    fault: str | None,
    path: str,
    req: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> bool:
    """Answer one POST (faulted or not); False when the connection is done with."""
    if fault == "hang":
        await reader.read()  # until the peer closes
        fake.closed_at.append(time.monotonic())
        return False
    if fault == "slow":
        await asyncio.sleep(fake.delay)
    if fault in ERRORS:
        status, err = ERRORS[fault]
        writer.write(_response(status, err))
        await writer.drain()
        return True
    stream = path == CHAT_PATH and bool(req.get("stream"))
    if fault == "errorobj":
        writer.write(_response("200 OK", ERROR_OBJECT))
        await writer.drain()
        return True
    if fault == "huge":
        await _huge(fake, writer, stream)
        return False
    if stream and fake.pace and fault is None:  # event by event, as a generating server sends them
        writer.write(SSE_CHUNKED_HEAD)
        for event in chat_events(req, fault, fake.newline):
            writer.write(_chunk(event))
            await writer.drain()
            await asyncio.sleep(fake.pace)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    if stream:
        events = chat_events(req, fault, fake.newline)
        head, payload = SSE_CHUNKED_HEAD, b"".join(_chunk(e) for e in events) + b"0\r\n\r\n"
    else:
        if path == CHAT_PATH:
            body = b"this is { not json" if fault == "badjson" else chat_body(req, fault)
        elif path == SCORE_PATH:
            body = b"this is { not json" if fault == "badjson" else position_body(req, fault)
        elif path == EXACT_SCORE_PATH and fake.score_route:
            body = b"this is { not json" if fault == "badjson" else exact_scores_body(req, fault)
        elif path == "/apply-template":
            body = b'{"prompt":"<user>Hi<end>"}'
        elif path == "/tokenize":
            body = b'{"tokens":[2,3,4]}'
        else:
            writer.write(_response("404 Not Found", b'{"error":{"code":404,"message":"no such route"}}'))
            await writer.drain()
            return True
        whole = _response("200 OK", body)
        cut = whole.index(b"\r\n\r\n") + 4
        head, payload = whole[:cut], whole[cut:]
    if fault == "status201":
        head = head.replace(b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created", 1)
    if fault == "midstream":
        writer.write(head + payload[: len(payload) // 2])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
        return False
    if fault == "drip":
        writer.write(head)
        for i in range(len(payload)):
            writer.write(payload[i : i + 1])
            await writer.drain()
            await asyncio.sleep(fake.delay)
        return True
    writer.write(head + payload)
    await writer.drain()
    return True


async def _huge(fake: LlamaFake, writer: asyncio.StreamWriter, stream: bool) -> None:
    """``fake.huge`` bytes: one SSE ``data:`` line that never ends, or a JSON body that never ends,
    in 64 KiB pieces, each written only once the last was taken (so ``huge_sent`` is what the peer
    read, give or take the sockets' buffers)."""
    writer.write(SSE_CHUNKED_HEAD if stream else _CHUNKED_JSON_HEAD)
    piece = _chunk((b'data: {"x":"' if stream else b'{"x":"') + b"y" * 65536)
    sent = 0
    while sent < fake.huge:
        writer.write(piece)
        await writer.drain()  # raises once the peer has closed
        sent += len(piece)
        fake.huge_sent += len(piece)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


_CHUNKED_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
    b"connection: keep-alive\r\n\r\n"
)


@contextmanager
def llama_fake(
    fault: str | None = None,
    *,
    paths: frozenset[str] | None = None,
    delay: float = 0.2,
    score_route: bool = False,
    newline: bytes = b"\n",
    pace: float = 0.0,
) -> Iterator[LlamaFake]:
    """Run one :class:`LlamaFake` in a thread on a free loopback port."""
    fake = LlamaFake(delay=delay, score_route=score_route, newline=newline, pace=pace)
    if paths is not None:
        fake.fault_paths = paths
    loop = asyncio.new_event_loop()
    fake.loop = loop
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        await fake.listen()
        started.set()
        await stop.wait()
        if fake.server is not None:
            fake.server.close()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    thread = threading.Thread(target=lambda: (loop.run_until_complete(main()), loop.close()), daemon=True)
    thread.start()
    started.wait(10)
    if fault is not None:
        fake.set_fault(fault)
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
