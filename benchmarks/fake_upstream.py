"""A fast fake OpenAI / llama-server upstream on loopback, for the proxy-overhead benchmark.

Raw asyncio on uvloop with httptools' parser (HTTP/1.1 keep-alive), canned answers built once:
``POST /v1/chat/completions`` (JSON, or SSE with ``--tokens`` chunks ``--delay-ms`` apart), with
llama-server's logprob entries (token ids, top-K) when the request asks for logprobs, so a kvproxy
shadow job lines up and is scored; ``/apply-template``, ``/tokenize`` and ``/completion`` (one
position's top-K per prompt, for one prompt or an array of them, as kvproxy's per-position reference
scoring asks) so the same process can serve
as a fast reference; ``GET /health``. Anything else is 404.

With ``--score-route`` it also answers as a kvproxy scoring server (``GET /kvproxy/v1/info``,
``POST /kvproxy/v1/score``: one request per shadow job), and ``--fail-every N`` makes every N-th
scoring request (``/completion`` or ``/kvproxy/v1/score``) a 500: a reference that fails 1/N of the
time, deterministically. ``GET /stats`` counts the requests by path (and the failures it answered),
so a load test can reconcile the client's, the proxy's and the upstream's counts.

    python benchmarks/fake_upstream.py --port 9100 --tokens 16 --delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import httptools
import uvloop

WORD_IDS = list(range(1000, 1064))


def _chat(tokens: int, logprobs: bool, top: int) -> dict[str, Any]:
    content = "".join(f" w{i}" for i in range(tokens))
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": content},
    }
    if logprobs:
        choice["logprobs"] = {"content": [_entry(i, top) for i in range(tokens)]}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": "fake",
        "choices": [choice],
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
    }


def _entry(i: int, top: int) -> dict[str, Any]:
    tok = WORD_IDS[i % len(WORD_IDS)]
    tops = [{"id": tok + j, "token": f" w{j}", "logprob": -0.1 - j, "bytes": None} for j in range(top)]
    return {"id": tok, "token": f" w{i}", "logprob": -0.1, "bytes": None, "top_logprobs": tops}


def _stream(tokens: int, logprobs: bool, top: int) -> list[bytes]:
    events = []
    for i in range(tokens):
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
        if logprobs:
            choice["logprobs"] = {"content": [_entry(i, top)]}
        events.append(
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake", "choices": [choice]}
        )
    events.append(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "fake",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
        }
    )
    events.append(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "fake",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
        }
    )
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def _response(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}[status]
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
        % (status, reason, ctype, len(body))
        + body
    )


class Canned:
    def __init__(self, tokens: int, top: int) -> None:
        self.top = top
        self.chat = _response(200, json.dumps(_chat(tokens, False, 0)).encode())
        self.chat_lp = _response(200, json.dumps(_chat(tokens, True, top)).encode())
        self.stream = _stream(tokens, False, 0)
        self.stream_lp = _stream(tokens, True, top)
        self.health = _response(200, b'{"status":"ok"}')
        self.template = _response(200, b'{"prompt":"<start_of_turn>user\\nhello<end_of_turn>\\n"}')
        self.tokenize = _response(200, json.dumps({"tokens": list(range(2, 14))}).encode())
        words = [WORD_IDS[i % len(WORD_IDS)] for i in range(tokens)]
        self.answer_tokens = _response(200, json.dumps({"tokens": words}).encode())
        tops = [{"id": WORD_IDS[0] + j, "token": f" w{j}", "logprob": -0.12 - j} for j in range(top)]
        self._one = {"completion_probabilities": [{"top_logprobs": tops}]}
        self.position = _response(200, json.dumps(self._one).encode())
        self._positions: dict[int, bytes] = {}
        self.not_found = _response(404, b'{"error":{"message":"not found","code":404}}')
        self.failure = _response(500, b'{"error":{"message":"reference failure","code":500}}')
        self.info = _response(
            200,
            json.dumps(
                {
                    "score": True,
                    "model": "fake",
                    "primary": {"cache_type_k": "q4_0", "cache_type_v": "q4_0"},
                    "reference": {"cache_type_k": "f16", "cache_type_v": "f16"},
                }
            ).encode(),
        )
        self.scores: dict[int, bytes] = {}

    def positions(self, n: int) -> bytes:
        """A batched ``/completion``: one top-K per prompt, as llama-server lists them."""
        if n not in self._positions:
            self._positions[n] = _response(
                200, json.dumps([{"index": i, **self._one} for i in range(n)]).encode()
            )
        return self._positions[n]

    def score(self, n: int) -> bytes:
        """Exact scores for ``n`` positions, as ``kvproxy backend`` answers ``/kvproxy/v1/score``."""
        if n not in self.scores:
            body = {
                "kld": [0.01] * n,
                "same_top": [True] * n,
                "p_ref": [0.9] * n,
                "p_primary": [0.88] * n,
                "check_logprobs": [[-0.1 - j for j in range(self.top)] for _ in range(n)],
            }
            self.scores[n] = _response(200, json.dumps(body).encode())
        return self.scores[n]


class Stats:
    """Requests by path, and the scoring requests answered with a failure (``--fail-every``)."""

    def __init__(self, fail_every: int, score_route: bool) -> None:
        self.fail_every = fail_every
        self.score_route = score_route
        self.by_path: dict[str, int] = {}
        self.failed = 0
        self.scoring = 0

    def count(self, url: bytes) -> None:
        path = url.decode("latin-1")
        self.by_path[path] = self.by_path.get(path, 0) + 1

    def fail_now(self) -> bool:
        """Every ``fail_every``-th scoring request fails."""
        self.scoring += 1
        if self.fail_every and self.scoring % self.fail_every == 0:
            self.failed += 1
            return True
        return False

    def body(self) -> bytes:
        return _response(200, json.dumps({"by_path": self.by_path, "failed": self.failed}).encode())


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Upstream(asyncio.Protocol):
    def __init__(self, canned: Canned, delay: float, tokens: int, stats: Stats) -> None:
        self.canned, self.delay, self.tokens, self.stats = canned, delay, tokens, stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.queue.put_nowait((self.url, b"".join(self.body)))
        self.url, self.body = b"", []

    async def serve(self) -> None:
        """Answers in order (HTTP/1.1 pipelining order), one request at a time per connection."""
        c = self.canned
        assert self.transport is not None
        t = self.transport
        while True:
            item = await self.queue.get()
            if item is None:
                return
            url, body = item
            self.stats.count(url)
            if url == b"/v1/chat/completions":
                logprobs = b'"logprobs"' in body
                if b'"stream":true' in body.replace(b" ", b""):
                    t.write(SSE_HEAD)
                    for event in c.stream_lp if logprobs else c.stream:
                        if self.delay:
                            await asyncio.sleep(self.delay)
                        t.write(b"%x\r\n%s\r\n" % (len(event), event))
                    t.write(b"0\r\n\r\n")
                else:
                    if self.delay:  # the time a real server takes to generate the same tokens
                        await asyncio.sleep(self.delay * self.tokens)
                    t.write(c.chat_lp if logprobs else c.chat)
            elif url == b"/health":
                t.write(c.health)
            elif url == b"/apply-template":
                t.write(c.template)
            elif url == b"/tokenize":  # an answer's text (no BOS) is one token a word, as made
                t.write(c.answer_tokens if b'"add_special":false' in body else c.tokenize)
            elif url == b"/completion":
                if self.stats.fail_now():
                    t.write(c.failure)
                elif body.startswith(b'{"prompt":[[') or b'"prompt":[[' in body:  # a batch of prompts
                    t.write(c.positions(len(json.loads(body)["prompt"])))
                else:
                    t.write(c.position)
            elif url == b"/kvproxy/v1/score" and self.stats.score_route:
                if self.stats.fail_now():
                    t.write(c.failure)
                else:
                    t.write(c.score(len(json.loads(body)["token_ids"])))
            elif url == b"/kvproxy/v1/info" and self.stats.score_route:
                t.write(c.info)
            elif url == b"/stats":
                t.write(self.stats.body())
            else:
                t.write(c.not_found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--score-route", action="store_true", help="also act as a kvproxy scoring server")
    ap.add_argument("--fail-every", type=int, default=0, help="every N-th scoring request is a 500")
    args = ap.parse_args()
    canned = Canned(args.tokens, args.top)
    stats = Stats(args.fail_every, args.score_route)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Upstream(canned, args.delay_ms / 1000, args.tokens, stats),
            "127.0.0.1",
            args.port,
            backlog=1024,
        )
        print(f"fake upstream on 127.0.0.1:{args.port} (pid {os.getpid()})", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


if __name__ == "__main__":
    main()
