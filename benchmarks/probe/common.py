"""What every part of the probe shares: the tally, the target server, small HTTP helpers."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import RunningServer, start_server, stop_server

# a marker in every prompt the probe sends: the logs must never show it
MARKER = "probe-marker-7f3a"


@dataclass
class Tally:
    """Attempts, passes and the failures with what was seen, per part."""

    part: str = ""
    counts: dict[str, list[int]] = field(default_factory=dict)  # part: [attempts, passed]
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        c = self.counts.setdefault(self.part, [0, 0])
        c[0] += 1
        if ok:
            c[1] += 1
        else:
            self.failures.append(f"[{self.part}] {name}: {detail}")
        return ok

    @property
    def attempts(self) -> int:
        return sum(c[0] for c in self.counts.values())

    @property
    def passed(self) -> int:
        return sum(c[1] for c in self.counts.values())

    def report(self) -> str:
        lines = [f"{'part':<12} {'attempts':>8} {'passed':>7} {'failed':>7}"]
        for part, (n, ok) in self.counts.items():
            lines.append(f"{part:<12} {n:>8} {ok:>7} {n - ok:>7}")
        lines.append(f"{'total':<12} {self.attempts:>8} {self.passed:>7} {self.attempts - self.passed:>7}")
        if self.failures:
            lines.append("failures:")
            lines.extend(f"  {f}" for f in self.failures)
        return "\n".join(lines)


@dataclass
class Target:
    base_url: str
    keys: tuple[str, str]
    admin: str
    model: str
    server: RunningServer | None = None  # started by the probe: its process and log are there

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server is not None else None

    def client(self, key: str | None = None, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def chat_body(self, content: str = "Hi", **extra: Any) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": f"{content} {MARKER}"}],
            "max_tokens": 1,
            **extra,
        }


KEYS = ("probe-key-one-0123456789", "probe-key-two-abcdefghij")
ADMIN = "probe-admin-token-zyx"


@contextlib.contextmanager
def production_server(args: list[str], file_limit: int | None) -> Iterator[Target]:
    """``kvproxy serve`` as in production: two API keys and an admin token from the environment."""
    env = {"KVPROXY_API_KEYS": ",".join(KEYS), "KVPROXY_ADMIN_TOKEN": ADMIN}
    srv = start_server(*args, env=env, file_limit=file_limit)
    try:
        yield Target(srv.base_url, KEYS, ADMIN, srv.model, srv)
    finally:
        if srv.process.poll() is None:
            stop_server(srv)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def health_latency(port: int, timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET /health on a fresh connection; status 0 when it failed."""
    t0 = time.monotonic()
    status = 0
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        head = sock.recv(4096)
        if head.startswith(b"HTTP/1.1 "):
            status = int(head.split(b" ", 2)[1])
    return status, time.monotonic() - t0


def raw_exchange(port: int, request: bytes, timeout: float = 10.0, head_only: bool = False) -> bytes:
    """Send bytes as they are; what the server answers until it closes (or the timeout), or with
    ``head_only`` until the end of the first response's head."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if head_only and b"\r\n\r\n" in b"".join(chunks):
                    break
    return b"".join(chunks)


def openai_shaped(resp: httpx.Response) -> bool:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
