"""The server's side of grammar compilation: one child process that turns JSON schemas into checked
llama.cpp grammars (kvproxy.backends.grammar_child says why a child), driven from one thread.

A schema is sent as compact JSON, refused at once when it is over ``schema_max_bytes``. Requests are
served one at a time, in order, on the compiler's own thread, so the event loop never waits on the
child, and a request whose client left still reads its answer (nothing is left in the pipe for the
next one). The child is started with the backend and started again when it has died: a child that
dies on a schema, or takes longer than COMPILE_TIMEOUT on it, is a refusal of that schema (a 400),
and the next request gets a fresh child.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvproxy.backends.base import BackendError
from kvproxy.schema_limits import SchemaLimits, SchemaRefused

log = logging.getLogger(__name__)

COMPILE_TIMEOUT = 10.0  # seconds one schema may take in the child
START_TIMEOUT = 60.0  # seconds the child may take to start (it loads llama.cpp)
MAX_FRAME = 64 * 2**20


class GrammarCompiler:
    """Compiles JSON schemas in a child process; :meth:`compile` from the event loop."""

    def __init__(self, limits: SchemaLimits) -> None:
        self.limits = limits
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvproxy-grammar")

    def start(self) -> None:
        """Start the child now (it loads while the model does); answers wait for it to be ready."""
        self._thread.submit(self._spawn)

    async def compile(self, schema: dict[str, Any]) -> str:
        """The grammar for ``schema``, or :class:`SchemaRefused` (a ValueError), or BackendError
        when no child can be started."""
        text = json.dumps({"schema": schema}, separators=(",", ":"), ensure_ascii=False)
        body = text.encode("utf-8", errors="surrogatepass")
        if len(body) - 12 > self.limits.max_bytes:  # 12: {"schema":...}
            raise SchemaRefused(
                "schema_max_bytes", f"The schema is more than {self.limits.max_bytes} bytes as JSON"
            )
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._thread, self._exchange, body)
        if "grammar" in reply:
            return str(reply["grammar"])
        raise SchemaRefused.restored(
            str(reply.get("bound", "schema")),
            str(reply.get("refused", "The schema was refused")),
            str(reply.get("detail", "")),
        )

    def close(self) -> None:
        """Kill the child; an exchange still running on the compiler's thread reads its end (the
        streams are the thread's to close, so nothing is closed under it)."""
        self._thread.shutdown(wait=False, cancel_futures=True)
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    # ---- the compiler's thread ----------------------------------------------------------------

    def _spawn(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self._ready = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kvproxy.backends.grammar_child", json.dumps(asdict(self.limits))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            bufsize=0,
        )

    def _live(self) -> subprocess.Popen[bytes]:
        """The child, started (again) if need be, once it has said it is ready."""
        self._spawn()
        proc = self._proc
        assert proc is not None
        if not self._ready:
            try:
                self._read(proc, START_TIMEOUT)
            except (TimeoutError, EOFError) as exc:
                why = self._stop()
                raise BackendError(f"the grammar compiler did not start ({why or exc!r})") from None
            self._ready = True
        return proc

    def _exchange(self, body: bytes) -> dict[str, Any]:
        for attempt in (1, 2):
            proc = self._live()
            try:
                assert proc.stdin is not None
                proc.stdin.write(len(body).to_bytes(4, "big") + body)
            except (BrokenPipeError, ConnectionError):  # it had died before this schema: once more
                self._stop()
                if attempt == 2:
                    raise BackendError("the grammar compiler is not running") from None
                continue
            try:
                reply: dict[str, Any] = self._read(proc, COMPILE_TIMEOUT)
                return reply
            except TimeoutError:
                self._stop()
                return {
                    "refused": f"Building the schema's grammar took more than {COMPILE_TIMEOUT:g} s",
                    "bound": "grammar compile time",
                }
            except EOFError:
                code = self._stop()
                return {
                    "refused": "Building the schema's grammar ended its compiler process "
                    f"({_exit_reason(code)}); the server is unaffected",
                    "bound": "grammar compiler crash",
                }
        raise AssertionError("unreachable")

    def _read(self, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        head = self._read_exactly(proc, 4, deadline)
        size = int.from_bytes(head, "big")
        if size > MAX_FRAME:
            raise EOFError("frame too large")
        reply: dict[str, Any] = json.loads(self._read_exactly(proc, size, deadline))
        return reply

    @staticmethod
    def _read_exactly(proc: subprocess.Popen[bytes], n: int, deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    def _stop(self) -> int | None:
        """Kill the child (if alive) and reap it; its exit code. What it wrote before it was ready
        (an import error, say) goes to the debug log."""
        proc, self._proc, self._ready = self._proc, None, False
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = proc.wait()
        if proc.stderr is not None:
            with contextlib.suppress(OSError):
                early = proc.stderr.read(4096) if code != -9 else b""
                if early:
                    log.debug("grammar compiler stderr: %s", early.decode(errors="replace"))
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return code


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "gone"
    if code < 0:
        import signal

        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
