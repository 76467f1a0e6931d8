"""The fault matrix: every way a primary or a reference can misbehave, against the real proxy.

Each case runs a real kvproxy (uvicorn in a thread) in front of two fake llama-servers on loopback
(tests/fault_servers.py), switches one fault on, sends the request a client would, and asserts the
client's outcome exactly; then switches the fault off, asserts a good request is served as before,
and that nothing leaked (the proxy loop's tasks, the fakes' connections, this process's descriptors).

A primary fault reaches the client as a mapped OpenAI error (or, once a stream has started, an SSE
error event), identically whether the request was shadowed or not. A reference fault never reaches
the client: the shadowed response is byte for byte the unshadowed one, and the job is counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from kvproxy import sse
from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments
from kvproxy.deployments.spec import ProxyConfig
from tests.conftest import serve_in_thread, wait_for
from tests.fault_servers import (
    CHAT_PATH,
    EXACT_SCORE_PATH,
    FAULTS,
    SCORE_PATH,
    LlamaFake,
    chat_body,
    chat_events,
    llama_fake,
)

MSG = [{"role": "user", "content": "Hi"}]
TIMEOUTS = {"connect": 1.0, "read": 0.75, "total": 1.5}
# small bounds on what is read of an upstream answer, so the `huge` fault passes them quickly
LIMITS = Settings(upstream_max_body_bytes=256 << 10, upstream_max_event_bytes=64 << 10)


class LoopSeam:
    """ASGI wrapper that remembers the server's event loop (seen at lifespan start), so a test can
    count the tasks on it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class Snapshot:
    tasks: int
    fds: int
    open: tuple[int, ...]  # per fake: connections open


@dataclass
class Harness:
    client: httpx.Client
    seam: LoopSeam
    fakes: tuple[LlamaFake, ...]
    newline: bytes = b"\n"

    def task_names(self) -> list[str]:
        async def names() -> list[str]:
            me = asyncio.current_task()
            return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)

        assert self.seam.loop is not None
        return asyncio.run_coroutine_threadsafe(names(), self.seam.loop).result(5)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            len(self.task_names()), len(os.listdir("/proc/self/fd")), tuple(f.open for f in self.fakes)
        )

    def shadow(self) -> dict[str, Any]:
        status: dict[str, Any] = self.client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]
        return status

    def settled_shadow(self, timeout: float = 5.0) -> dict[str, Any]:
        """The shadow counters once nothing is queued or being scored; the accounting must add up."""
        s = self.shadow()
        assert wait_for(lambda: (s := self.shadow())["queued"] == 0 and s["in_flight"] == 0, timeout)
        s = self.shadow()
        assert s["sampled"] == s["scored"] + s["failed"] + s["dropped"], s
        return s


def assert_no_leaks(h: Harness, before: Snapshot, timeout: float = 3.0) -> None:
    """Within ``timeout`` the proxy loop's tasks, the fakes' open connections and this process's file
    descriptors are back to (at most) what they were before the faults, and no fake is still
    answering a request nobody reads."""

    def clean() -> bool:
        now = h.snapshot()
        return (
            now.tasks <= before.tasks
            and now.fds <= before.fds
            and all(n <= b for n, b in zip(now.open, before.open, strict=True))
            and all(f.busy == 0 for f in h.fakes)
        )

    if not wait_for(clean, timeout):
        now = h.snapshot()
        raise AssertionError(
            f"leak: before {before}, after {now}, busy {[f.busy for f in h.fakes]}, tasks {h.task_names()}"
        )


@contextmanager
def harness(
    *, timeouts: dict[str, float] = TIMEOUTS, score_route: bool = False, **fake_opts: Any
) -> Iterator[Harness]:
    """kvproxy in front of a fake primary and a fake reference (a plain llama-server, or a kvproxy
    scoring server with ``score_route``), both healthy."""
    with llama_fake(**fake_opts) as primary, llama_fake(score_route=score_route, **fake_opts) as reference:
        spec: dict[str, Any] = {
            "model": "m",
            "primary": {"urls": [primary.url]},
            "reference": {"urls": [reference.url]},
            "timeouts": timeouts,
            "health_interval": 30,  # no health checks during a case: the task count stays still
            "shadow_rate": 0,  # only the X-KVProxy-Shadow header shadows
            "top_k": 2,
            "primary_logprobs": True,  # the logprobs path (the default: tests/test_shadow_unchanged.py)
        }
        seam = LoopSeam(create_app(build_deployments(ProxyConfig(deployments=[spec]), LIMITS)))
        with serve_in_thread(seam) as url, httpx.Client(base_url=url, timeout=30) as client:
            yield Harness(client, seam, (primary, reference), primary.newline)


def request(stream: bool) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, "stream": stream}


def good_bytes(stream: bool, fault: str | None = None, newline: bytes = b"\n") -> bytes:
    """What the fake primary sends for the client's own request: what an unshadowed relay returns."""
    req = request(stream)
    return b"".join(chat_events(req, fault, newline)) if stream else chat_body(req, fault)


# the fakes' SSE line ends rotate over the cases: llama-server's LF, sse-starlette's CRLF, a lone CR
NEWLINES = (b"\n", b"\r\n", b"\r")


def newline_of(fault: str, stream: bool) -> bytes:
    return NEWLINES[(sorted(FAULTS).index(fault) + stream) % len(NEWLINES)]


def send(h: Harness, stream: bool, shadow: str) -> httpx.Response:
    return h.client.post(CHAT_PATH, json=request(stream), headers={"X-KVProxy-Shadow": shadow})


def warm_up(h: Harness) -> Snapshot:
    """Good requests on every path (pooled connections exist), then the baseline."""
    for stream in (False, True):
        for shadow in ("skip", "force"):
            resp = send(h, stream, shadow)
            assert resp.status_code == 200 and resp.content == good_bytes(stream, newline=h.newline)
    h.settled_shadow()
    return h.snapshot()


@dataclass(frozen=True)
class Err:
    """An OpenAI error answered before any byte of the response."""

    status: int
    code: str | None
    type: str = "server_error"
    message: str | None = None  # a substring


@dataclass(frozen=True)
class StreamErr:
    """A 200 stream that ends with an SSE error event (no ``[DONE]``)."""

    code: str


@dataclass(frozen=True)
class Relayed:
    """A 200 whose body is exactly what the fake primary sent (with this fault, if any)."""

    fault: str | None = None


Outcome = Err | StreamErr | Relayed

# fault -> (non-streaming outcome, streaming outcome, shadow outcome of a forced request)
PRIMARY: dict[str, tuple[Outcome | None, Outcome, str]] = {
    "refuse": (Err(502, "upstream_unavailable"), Err(502, "upstream_unavailable"), "dropped"),
    "hang": (Err(504, "upstream_timeout"), Err(504, "upstream_timeout"), "dropped"),
    "slow": (Relayed(), Relayed(), "scored"),
    "drip": (
        Err(504, "upstream_timeout", message="total deadline"),
        StreamErr("upstream_timeout"),
        "dropped",
    ),
    "midstream": (Err(502, "upstream_unavailable"), StreamErr("upstream_unavailable"), "dropped"),
    "nodone": (None, StreamErr("upstream_stream_ended"), "dropped"),
    # a non-JSON data line inside a stream is relayed as sent: the proxy does not validate events
    "badjson": (Err(502, "upstream_invalid_response"), Relayed("badjson"), "dropped"),
    "error400": (
        Err(400, "400", "invalid_request_error", "bad thing"),
        Err(400, "400", "invalid_request_error", "bad thing"),
        "dropped",
    ),
    "error429": (
        Err(429, "429", "rate_limit_error", "slow down"),
        Err(429, "429", "rate_limit_error"),
        "dropped",
    ),
    "error500": (
        Err(502, "upstream_error", message="boom"),
        Err(502, "upstream_error", message="boom"),
        "dropped",
    ),
    "error503": (
        Err(503, "503", "unavailable_error", "Loading model"),
        Err(503, "503", "unavailable_error", "Loading model"),
        "dropped",
    ),
    # logprobs that do not line up with the tokens are the shadow path's problem, never the client's
    "lpcount": (Relayed(), Relayed(), "dropped"),
    "lpids": (Relayed(), Relayed(), "dropped"),
    # issue 25: what an upstream says with a 200 (or a 201) is not always a success
    "errorobj": (
        Err(502, "upstream_error", message="it went wrong"),
        Err(502, "upstream_error", message="it went wrong"),
        "dropped",
    ),
    "status201": (Err(502, "upstream_invalid_response"), Err(502, "upstream_invalid_response"), "dropped"),
    # a body or an SSE line past the bounds (LIMITS) is cut off, never held whole
    "huge": (Err(502, "upstream_response_too_large"), StreamErr("upstream_response_too_large"), "dropped"),
}


def sse_data(body: bytes) -> list[bytes]:
    return [e.data for e in sse.SSEDecoder().feed(body) if e.data is not None]


def assert_outcome(resp: httpx.Response, expected: Outcome, stream: bool, newline: bytes) -> None:
    if isinstance(expected, Relayed):
        assert resp.status_code == 200, resp.content
        assert resp.content == good_bytes(stream, expected.fault, newline)
        return
    if isinstance(expected, StreamErr):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = sse_data(resp.content)
        assert b"[DONE]" not in data
        last = json.loads(data[-1])
        assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}
        assert last["error"]["code"] == expected.code and last["error"]["type"] == "server_error"
        return
    assert resp.status_code == expected.status, resp.content
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert set(resp.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["code"] == expected.code and err["type"] == expected.type
    if expected.message is not None:
        assert expected.message in err["message"]


CASES = [
    (fault, stream)
    for fault, (plain, streamed, _) in PRIMARY.items()
    for stream, outcome in ((False, plain), (True, streamed))
    if outcome is not None
]


@pytest.mark.parametrize(
    ("fault", "stream"), CASES, ids=[f"{f}-{'stream' if s else 'json'}" for f, s in CASES]
)
def test_primary_fault(fault: str, stream: bool) -> None:
    """Shadowed or not, the client sees the same mapped outcome; then the proxy serves as before."""
    newline = newline_of(fault, stream)
    with harness(delay=0.05 if fault == "drip" else 0.2, newline=newline) as h:
        before = warm_up(h)
        counts = h.shadow()
        h.fakes[0].set_fault(fault)
        plain, streamed, outcome = PRIMARY[fault]
        expected = streamed if stream else plain
        assert expected is not None
        for shadow in ("skip", "force"):
            assert_outcome(send(h, stream, shadow), expected, stream, newline)
        after = h.settled_shadow()
        assert after["sampled"] == counts["sampled"] + 1  # the skipped request was never sampled
        assert after[outcome] == counts[outcome] + 1
        h.fakes[0].set_fault(None)
        for shadow in ("skip", "force"):
            resp = send(h, stream, shadow)
            assert resp.status_code == 200 and resp.content == good_bytes(stream, newline=newline)
        h.settled_shadow()
        assert_no_leaks(h, before)


# fault on the reference's scoring route -> shadow outcome (the client never sees it)
REFERENCE: dict[str, str] = {
    "refuse": "failed",
    "hang": "failed",
    "slow": "scored",
    "drip": "failed",  # bounded by the total deadline, like any exchange
    "midstream": "failed",
    "badjson": "failed",
    "error400": "failed",
    "error429": "failed",
    "error500": "failed",
    "error503": "failed",
    "lpcount": "failed",  # no top-K for the position
    "lpids": "failed",  # top-K without token ids
    "errorobj": "failed",
    "status201": "failed",
    "huge": "failed",  # past the body bound: cut off
}
REF_CASES = [(fault, stream) for fault in REFERENCE for stream in (False, True)]


@pytest.mark.parametrize(
    ("fault", "stream"), REF_CASES, ids=[f"{f}-{'stream' if s else 'json'}" for f, s in REF_CASES]
)
def test_reference_fault(fault: str, stream: bool) -> None:
    """The shadowed response is byte for byte the unshadowed one; the job is counted, never raised."""
    newline = newline_of(fault, stream)
    with harness(delay=0.05 if fault == "drip" else 0.2, newline=newline) as h:
        before = warm_up(h)
        plain = send(h, stream, "skip")
        counts = h.settled_shadow()
        h.fakes[1].set_fault(fault)
        start = time.monotonic()
        forced = send(h, stream, "force")
        assert time.monotonic() - start < TIMEOUTS["read"]  # the client never waits on the reference
        assert forced.status_code == plain.status_code == 200
        assert forced.headers["content-type"] == plain.headers["content-type"]
        assert forced.content == plain.content == good_bytes(stream, newline=newline)
        after = h.settled_shadow(timeout=TIMEOUTS["total"] * 4)
        outcome = REFERENCE[fault]
        assert after["sampled"] == counts["sampled"] + 1
        assert after[outcome] == counts[outcome] + 1, after
        assert h.fakes[1].posts.get(SCORE_PATH, 0) > 0  # the fault was met on the scoring route
        h.fakes[1].set_fault(None)
        resp = send(h, stream, "force")
        assert resp.status_code == 200 and resp.content == good_bytes(stream, newline=newline)
        assert h.settled_shadow()["scored"] == after["scored"] + 1  # scoring works again
        assert_no_leaks(h, before)


def test_an_oversized_answer_is_cut_off_not_read_whole() -> None:
    """Issue 25, finding 9: a 300 MB upstream body was read whole (the proxy reached 917 MiB). Past
    the bound the proxy stops reading: the fake, which writes 64 MiB a piece at a time as they are
    taken, got rid of no more than the bound and the sockets' buffers."""
    with harness() as h:
        primary, reference = h.fakes
        primary.set_fault("huge")
        for stream in (False, True):
            primary.huge_sent = 0
            assert_outcome(send(h, stream, "skip"), PRIMARY["huge"][stream], stream, h.newline)  # type: ignore[arg-type]
            assert primary.huge_sent < 16 << 20, primary.huge_sent
        primary.set_fault(None)
        reference.set_fault("huge")
        counts = h.settled_shadow()
        assert send(h, False, "force").status_code == 200
        assert h.settled_shadow()["failed"] == counts["failed"] + 1
        assert 0 < reference.huge_sent < 16 << 20, reference.huge_sent


@pytest.mark.parametrize("fault", ["error500", "badjson", "lpcount"])
def test_scoring_server_reference_fault(fault: str) -> None:
    """A kvproxy scoring server as the reference (one request a job): a failed answer, or scores for
    fewer positions than tokens, fail the job; nothing reaches the client."""
    with harness(score_route=True) as h:
        before = warm_up(h)
        assert h.client.get("/kvproxy/v1/status").json()["deployments"][0]["estimator"] == "exact"
        counts = h.settled_shadow()
        h.fakes[1].set_fault(fault)
        resp = send(h, False, "force")
        assert resp.status_code == 200 and resp.content == good_bytes(False)
        after = h.settled_shadow()
        assert after["failed"] == counts["failed"] + 1 and after["scored"] == counts["scored"], after
        assert h.fakes[1].posts[EXACT_SCORE_PATH] == counts["sampled"] + 1
        h.fakes[1].set_fault(None)
        assert_no_leaks(h, before)


@pytest.mark.parametrize("route", ["/apply-template", "/tokenize"])
def test_primary_tokenizer_failure_only_fails_the_shadow_job(route: str) -> None:
    """The shadow path also asks the primary (its template and tokenizer): a failure there is a
    failed job, never a client error."""
    with harness(paths=frozenset({route})) as h:
        before = warm_up(h)
        counts = h.settled_shadow()
        h.fakes[0].set_fault("error500")
        resp = send(h, False, "force")
        assert resp.status_code == 200 and resp.content == good_bytes(False)
        assert h.settled_shadow()["failed"] == counts["failed"] + 1
        h.fakes[0].set_fault(None)
        assert_no_leaks(h, before)


# ---- a client that goes away ----------------------------------------------------------------------


def chat_requests(h: Harness, status: str) -> int:
    """The proxy's count of chat requests answered with ``status`` (its /metrics)."""
    for line in h.client.get("/metrics").text.splitlines():
        if line.startswith("kvproxy_requests_total{") and f'status="{status}"' in line and CHAT_PATH in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def raw_post(h: Harness, body: dict[str, Any], shadow: str) -> socket.socket:
    """Send a request on a raw socket (so the test decides exactly when the client leaves)."""
    port = h.client.base_url.port
    assert port is not None
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {CHAT_PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"x-kvproxy-shadow: {shadow}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("shadow", ["skip", "force"])
def test_client_disconnect_closes_the_upstream_request_within_a_second(stream: bool, shadow: str) -> None:
    """A client that leaves while the proxy waits on a silent upstream (no byte yet, or a stream
    started): the upstream request is closed within one second, whatever the proxy's deadlines."""
    with harness(timeouts={"connect": 5, "read": 60, "total": 120}, delay=0.05) as h:
        before = warm_up(h)
        counts = h.settled_shadow()
        primary = h.fakes[0]
        primary.set_fault("drip" if stream else "hang")
        sock = raw_post(h, request(stream), shadow)
        if stream:  # the stream has started: its first bytes reached the client
            assert sock.recv(1)
        assert wait_for(lambda: primary.busy >= 1)
        closed = len(primary.closed_at)
        sock.close()
        left_at = time.monotonic()
        assert wait_for(lambda: len(primary.closed_at) > closed, 3.0), "the upstream request was never closed"
        assert primary.closed_at[-1] - left_at < 1.0
        if not stream:  # no answer ever began: the proxy counts the request as 499 (client closed)
            assert wait_for(lambda: chat_requests(h, "499") == 1)
        left = h.settled_shadow()  # an unfinished response is not scored
        assert (
            left["sampled"] - counts["sampled"] == left["dropped"] - counts["dropped"] == (shadow == "force")
        )
        primary.set_fault(None)
        resp = send(h, stream, shadow)
        assert resp.status_code == 200 and resp.content == good_bytes(stream)
        h.settled_shadow()
        assert_no_leaks(h, before)
