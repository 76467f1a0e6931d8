"""HTTP upstreams: one pooled aiohttp session per replica, least-outstanding balancing, health and
ejection.

aiohttp, not httpx, carries upstream traffic: under concurrency httpx's AsyncClient cost about 2 ms
of CPU a request and its pool fell over at 16 concurrent requests (encode/httpx#3215), and even over
an aiohttp transport httpx's own request layer added 0.23 ms a request; aiohttp directly costs a
small fraction of that (docs/benchmarks.md has the measurements).

A replica that refuses connections or times out is ejected at once; a background health check
(``GET /health`` every ``health_interval`` seconds, as llama-server answers 200 when ready and 503
while loading) returns it to the pool when it answers 200 again. When every replica is ejected the
pool still tries them (the least recently failed first) rather than refusing outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson

from kvproxy.tasks import cancel_and_wait

log = logging.getLogger(__name__)

CONNECTIONS_PER_REPLICA = 256  # the session's pool; kvproxy.http.connections reserves descriptors for it


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    read: float = 300.0  # between two bytes of a response (a long prefill can be silent a while)
    total: float = 900.0  # the whole exchange, a stream included

    def aiohttp(self) -> aiohttp.ClientTimeout:
        # the total deadline is enforced by the caller (asyncio.timeout_at), streams included
        return aiohttp.ClientTimeout(total=None, connect=self.connect, sock_read=self.read)


@dataclass(frozen=True)
class ResponseLimits:
    """What kvproxy holds of one upstream answer: upstream bytes are untrusted too
    (docs/reference-design.md). A 300 MB body read whole took the proxy to 917 MiB."""

    max_body_bytes: int = 64 * 2**20  # a whole (non-streamed) body
    max_event_bytes: int = 16 * 2**20  # one SSE event of a stream, a line without its end included


def too_large(url: str, what: str, limit: int, setting: str) -> UpstreamFailure:
    return UpstreamFailure(
        502,
        f"The upstream {url} sent {what} larger than kvproxy accepts ({limit:,} bytes; "
        f"KVPROXY_{setting.upper()} / --{setting.replace('_', '-')}).",
        type="server_error",
        code="upstream_response_too_large",
    )


async def read_capped(resp: aiohttp.ClientResponse, url: str, limit: int) -> bytes:
    """The whole body, or :class:`UpstreamFailure` as soon as it passes ``limit`` (a declared length
    over it is refused before a byte is read); the caller closes the connection then."""
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(url, "a body", limit, "upstream_max_body_bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large(url, "a body", limit, "upstream_max_body_bytes")
        parts.append(chunk)
    return b"".join(parts)


# every failure of an upstream exchange below the HTTP status: connection, timeout, broken payload
UpstreamError = (aiohttp.ClientError, TimeoutError)
JSON_HEADERS = {"content-type": "application/json"}


class UpstreamFailure(Exception):
    """An upstream exchange failed. Says what a client should be told: a status and the fields of an
    OpenAI error (the serving layer turns it into one; the shadow path only logs it)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "server_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def upstream_unavailable(url: str, exc: BaseException) -> UpstreamFailure:
    return UpstreamFailure(
        502,
        f"The upstream {url} is unavailable: {type(exc).__name__}: {exc}".rstrip(": "),
        type="server_error",
        code="upstream_unavailable",
    )


def upstream_timeout(url: str, what: str) -> UpstreamFailure:
    return UpstreamFailure(
        504,
        f"The upstream {url} did not answer in time ({what}).",
        type="server_error",
        code="upstream_timeout",
    )


class Replica:
    def __init__(
        self,
        url: str,
        timeouts: Timeouts,
        api_key: str | None = None,
        limits: ResponseLimits = ResponseLimits(),
    ) -> None:
        self.url = url.rstrip("/")
        self.timeouts = timeouts
        self.limits = limits
        # sent on every request (llama-server --api-key, kvproxy backend --api-key); never logged
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._session: aiohttp.ClientSession | None = None
        self.outstanding = 0
        self.healthy = True
        self.failed_at = 0.0
        self.failures = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running event loop (as aiohttp requires)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # idle connections closed after 4 s, before llama-server's HTTP library closes
                # them at 5 s (cpp-httplib's keep-alive timeout): fewer reuses of a dying socket
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_PER_REPLICA, limit_per_host=0, keepalive_timeout=4.0
                ),
                timeout=self.timeouts.aiohttp(),
                auto_decompress=False,  # relayed bytes stay as the upstream sent them
                skip_auto_headers=("User-Agent",),
                headers=self._headers,
            )
        return self._session

    def _exchange_timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        """A whole exchange's deadline (``total`` by default) with the connect and read timeouts.

        Always explicit: aiohttp reads ``timeout=None`` as "no timeout at all", which let a silent
        reference hold a shadow worker forever."""
        t = self.timeouts
        return aiohttp.ClientTimeout(
            total=t.total if total is None else total, connect=t.connect, sock_read=t.read
        )

    async def post(self, path: str, body: bytes, *, timeout: float | None = None) -> tuple[int, bytes]:
        """A whole JSON exchange (the shadow path and the scoring calls): status and body.

        These exchanges only read (tokenize, apply a template, score a prefix), so one that loses
        its connection before an answer came is sent once more, on a fresh connection: a pooled
        keep-alive connection the server closed just as it was reused ("Can not write request
        body", a disconnect before the status line) is a race, not a failing server. A refused
        connection is not retried (the server is down), nor a second drop.
        """
        try:
            return await self._post_once(path, body, timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not dropped(exc):
                raise
        return await self._post_once(path, body, timeout)

    async def _post_once(self, path: str, body: bytes, timeout: float | None) -> tuple[int, bytes]:
        t = self._exchange_timeout(timeout)
        async with self.session.post(self.url + path, data=body, headers=JSON_HEADERS, timeout=t) as r:
            return r.status, await self._read(r)

    async def get(
        self, path: str, *, timeout: float | None = None, max_bytes: int | None = None
    ) -> tuple[int, bytes]:
        """``max_bytes``: a tighter cap than the replica's limits, for a small answer read often (a
        scoring server's what-if): past it, :class:`UpstreamFailure` as with the limits."""
        async with self.session.get(self.url + path, timeout=self._exchange_timeout(timeout)) as r:
            return r.status, await self._read(r, max_bytes)

    async def _read(self, resp: aiohttp.ClientResponse, max_bytes: int | None = None) -> bytes:
        limit = (
            self.limits.max_body_bytes if max_bytes is None else min(max_bytes, self.limits.max_body_bytes)
        )
        try:
            return await read_capped(resp, self.url, limit)
        except UpstreamFailure:
            resp.close()  # the rest is not read: the connection cannot be reused
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def mark_failed(self, reason: str) -> None:
        if self.healthy:
            log.warning("upstream %s ejected: %s", self.url, reason)
        self.healthy = False
        self.failed_at = time.monotonic()
        self.failures += 1

    def mark_healthy(self) -> None:
        if not self.healthy:
            log.info("upstream %s is back", self.url)
        self.healthy = True


class ReplicaPool:
    """The replicas of one role (primary or reference) of one deployment."""

    def __init__(
        self,
        urls: list[str],
        timeouts: Timeouts,
        *,
        health_interval: float = 2.0,
        api_key: str | None = None,
        limits: ResponseLimits = ResponseLimits(),
    ) -> None:
        if not urls:
            raise ValueError("a replica pool needs at least one URL")
        self.timeouts = timeouts
        self.limits = limits
        self.replicas = [Replica(u, timeouts, api_key, limits) for u in urls]
        self.health_interval = health_interval
        self._health_task: asyncio.Task[None] | None = None

    def pick(self) -> Replica:
        healthy = [r for r in self.replicas if r.healthy]
        if healthy:
            return min(healthy, key=lambda r: r.outstanding)
        return min(self.replicas, key=lambda r: (r.failed_at, r.outstanding))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Replica]:
        replica = self.pick()
        replica.outstanding += 1
        try:
            yield replica
        finally:
            replica.outstanding -= 1

    async def check_health(self) -> None:
        async def one(r: Replica) -> None:
            try:
                status, _ = await r.get("/health", timeout=min(self.timeouts.connect, 5.0))
            except UpstreamError as exc:
                r.mark_failed(f"health check: {type(exc).__name__}")
                return
            if status == 200:
                r.mark_healthy()
            else:
                r.mark_failed(f"health check: HTTP {status}")

        await asyncio.gather(*(one(r) for r in self.replicas))

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check_health()
            await asyncio.sleep(self.health_interval)

    def start(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="kvproxy-health")

    async def close(self) -> None:
        await cancel_and_wait([self._health_task])
        self._health_task = None
        await asyncio.gather(*(r.close() for r in self.replicas))

    def status(self) -> list[dict[str, object]]:
        return [{"url": r.url, "healthy": r.healthy, "outstanding": r.outstanding} for r in self.replicas]


def refused(exc: BaseException) -> bool:
    """The request never reached the replica (connection refused or failed): safe to try another."""
    return isinstance(exc, aiohttp.ClientConnectorError)


def dropped(exc: BaseException) -> bool:
    """The connection closed under a request before any answer: a pooled keep-alive socket the
    server closed as it was reused (a refused connection is :func:`refused`, not this)."""
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and not isinstance(
        exc, aiohttp.ClientConnectorError
    )


def is_timeout(exc: BaseException) -> bool:
    """A read timeout or the caller's total deadline (a connect timeout is an unavailable replica)."""
    return isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError)


def map_transport_error(replica: Replica, exc: BaseException) -> UpstreamFailure:
    """Connection trouble -> 502 (and the replica is ejected); a read timeout or the deadline -> 504."""
    if is_timeout(exc):
        what = "read timeout" if isinstance(exc, aiohttp.ClientError) else "total deadline"
        return upstream_timeout(replica.url, what)
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        replica.mark_failed(type(exc).__name__)
    return upstream_unavailable(replica.url, exc)


def map_upstream_status(replica: Replica, status: int, body: bytes) -> UpstreamFailure:
    """An upstream error response as an OpenAI error: client errors keep their status, server errors
    become 502 (503 stays 503: the upstream is loading), and so do 401/403: the client's own key was
    checked by kvproxy, so an upstream refusal means kvproxy's key for it is wrong or missing."""
    if status < 400:  # 200 is the only success relayed: a 201, a 204 or a 3xx is not an answer
        return UpstreamFailure(
            502,
            f"The upstream {replica.url} answered HTTP {status}, not 200.",
            type="server_error",
            code="upstream_invalid_response",
        )
    message, etype, param, code = f"upstream answered HTTP {status}", None, None, None
    try:
        err = orjson.loads(body).get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype, param = err.get("type"), err.get("param")
            code = None if err.get("code") is None else str(err.get("code"))
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        if body:
            message += f": {body[:200].decode('utf-8', errors='replace')}"
    if status >= 500 and status != 503:
        return UpstreamFailure(
            502, f"The upstream {replica.url} failed: {message}", type="server_error", code="upstream_error"
        )
    if status in (401, 403):  # the upstream refused kvproxy's credentials: a server-side problem
        return UpstreamFailure(
            502,
            f"The upstream {replica.url} refused kvproxy's credentials (HTTP {status}); "
            "check the deployment's api_key_env.",
            type="server_error",
            code="upstream_auth_failed",
        )
    return UpstreamFailure(
        status,
        message,
        type=str(etype or ("invalid_request_error" if status < 500 else "unavailable_error")),
        param=param,
        code=code,
    )
