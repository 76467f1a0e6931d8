"""Process faults: start-up failures (a second instance on the port, bad settings, a file that is not
a model) exit 2 with one line and no traceback; a stopped and resumed server serves on; a client that
leaves mid-stream costs nothing; nothing secret or private reaches the log; SIGTERM drains a stream
in flight, refuses new connections and exits 0. The last one ends the server, so this part runs last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.probe.common import MARKER, Tally, Target, health_latency, openai_shaped, rss_mib
from tests.conftest import start_server, stop_server


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvproxy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _one_line_exit_2(result: subprocess.CompletedProcess[str], cause: str) -> tuple[bool, str]:
    lines = result.stderr.strip().splitlines()
    ok = result.returncode == 2 and len(lines) == 1 and cause in lines[0] and "Traceback" not in result.stderr
    return ok, f"exit {result.returncode}: {result.stderr.strip()[-300:]}"


def run(t: Target, tally: Tally) -> None:
    tally.part = "faults"
    port = str(t.port)
    with tempfile.TemporaryDirectory() as tmp:
        junk = Path(tmp) / "junk.gguf"
        junk.write_bytes(b"GGUF" + b"\x00" * 64)
        startup = [
            ("a second instance on the port", ["serve", "--port", port], {}, "address is already in use"),
            (
                "--metrics-port on a taken port",
                ["serve", "--port", "0", "--metrics-port", port],
                {},
                "already in use",
            ),
            (
                "--metrics-port equal to --port",
                ["serve", "--port", "8123", "--metrics-port", "8123"],
                {},
                "--port too",
            ),
            (
                "an unresolvable --host",
                ["serve", "--port", "0", "--host", "nowhere.invalid"],
                {},
                "cannot resolve",
            ),
            ("--log-level bogus", ["serve", "--port", "0", "--log-level", "bogus"], {}, "log level"),
            (
                "KVPROXY_LOG_LEVEL=verbose",
                ["serve", "--port", "0"],
                {"KVPROXY_LOG_LEVEL": "verbose"},
                "log level",
            ),
            ("an empty admin token", ["serve", "--port", "0", "--admin-token", ""], {}, "admin_token"),
            ("KVPROXY_ADMIN_TOKEN=''", ["serve", "--port", "0"], {"KVPROXY_ADMIN_TOKEN": ""}, "admin_token"),
            ("an empty --api-key", ["serve", "--port", "0", "--api-key", ""], {}, "api_keys"),
            ("a file that is not GGUF", ["serve", "--port", "0", "--model", str(junk)], {}, "GGUF"),
            ("an unknown cache type", ["serve", "--port", "0", "-ctk", "q3_k"], {}, "q3_k"),
            ("a port out of range", ["serve", "--port", "70000"], {}, "port"),
        ]
        for name, args, env, cause in startup:
            ok, detail = _one_line_exit_2(_cli(*args, env=env), cause)
            tally.check(f"start-up: {name}", ok, detail)
    _hostile_upstream(tally)
    if t.server is None:
        print("  faults: attached to a URL; the signal checks need a server the probe started")
        return
    pid = t.server.process.pid
    headers = {"Authorization": f"Bearer {t.keys[0]}"}
    # stopped for 3 s, then resumed: serves on
    os.kill(pid, signal.SIGSTOP)
    time.sleep(3)
    os.kill(pid, signal.SIGCONT)
    status, took = health_latency(t.port, timeout=10)
    tally.check("SIGSTOP 3 s, SIGCONT: /health", status == 200, f"{status} in {took:.2f} s")
    with httpx.Client(base_url=t.base_url, timeout=120, headers=headers) as http:
        tally.check(
            "SIGSTOP 3 s, SIGCONT: a chat",
            http.post("/v1/chat/completions", json=t.chat_body()).status_code == 200,
        )
        # a client that leaves mid-stream
        body = t.chat_body("Tell a long story.", max_tokens=200, stream=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    break
        t0 = time.monotonic()
        ok = http.post("/v1/chat/completions", json=t.chat_body()).status_code == 200
        tally.check(
            "a client that left mid-stream frees the server",
            ok and time.monotonic() - t0 < 10,
            f"{time.monotonic() - t0:.1f} s",
        )
    # the log: no prompt, no key, no token
    log = "".join(t.server.output)
    for secret, what in (
        (MARKER, "a prompt"),
        (t.keys[0], "API key 1"),
        (t.keys[1], "API key 2"),
        (t.admin, "the admin token"),
    ):
        tally.check(f"the log never shows {what}", secret not in log)
    tally.check("no traceback in the log", "Traceback" not in log, log[-500:])
    _sigterm(t, tally)


# issue 25, findings 9 and 10: what a llama-server primary answers is untrusted too
HOSTILE = (
    # fault, streamed, the client's status, its error code
    ("huge", False, 502, "upstream_response_too_large"),  # a 300 MB body
    ("huge", True, 200, "upstream_response_too_large"),  # a 300 MB line without an end
    ("errorobj", False, 502, "upstream_error"),  # 200 with {"error": ...}
    ("errorobj", True, 502, "upstream_error"),
    ("status201", False, 502, "upstream_invalid_response"),
    ("status201", True, 502, "upstream_invalid_response"),
    ("badjson", False, 502, "upstream_invalid_response"),
)


def _hostile_upstream(tally: Tally) -> None:
    """``kvproxy serve --primary`` in front of a fake llama-server that answers what no server
    should: the client gets a 502 in OpenAI's shape (a stream under way: that error event), the
    proxy's memory stays bounded, and it serves on."""
    from tests.fault_servers import llama_fake

    with llama_fake() as fake:
        fake.huge = 300 << 20
        srv = start_server("--primary", fake.url, "--alias", "m", "--shadow-rate", "0")
        try:
            body = {"model": "m", "messages": [{"role": "user", "content": f"Hi {MARKER}"}]}
            rss = rss_mib(srv.process.pid)
            with httpx.Client(base_url=srv.base_url, timeout=120) as http:
                for fault, stream, status, code in HOSTILE:
                    fake.set_fault(fault)
                    resp = http.post("/v1/chat/completions", json={**body, "stream": stream})
                    text = resp.text
                    # a stream that began ends with the error event (no [DONE]); else an OpenAI error
                    shaped = "[DONE]" not in text if status == 200 else openai_shaped(resp)
                    ok = resp.status_code == status and code in text and "Traceback" not in text and shaped
                    name = f"hostile upstream: {fault}{' streamed' if stream else ''}"
                    tally.check(name, ok, f"{resp.status_code} {text[:160]}")
                grown = rss_mib(srv.process.pid) - rss
                tally.check(
                    "hostile upstream: 300 MB bodies leave RSS bounded (< 200 MiB more)",
                    grown < 200,
                    f"+{grown:.0f} MiB; the fake got rid of {fake.huge_sent >> 20} MiB",
                )
                fake.set_fault(None)
                again = http.post("/v1/chat/completions", json=body)
                tally.check("hostile upstream: serves on", again.status_code == 200, again.text[:160])
        finally:
            stop_server(srv)


def _sigterm(t: Target, tally: Tally) -> None:
    assert t.server is not None
    headers = {"Authorization": f"Bearer {t.keys[0]}", "X-KVProxy-Shadow": "skip"}
    body = t.chat_body("Count to twenty.", max_tokens=60, stream=True)
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with (
            httpx.Client(base_url=t.base_url, timeout=120, headers=headers) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as resp,
        ):
            for line in resp.iter_lines():
                lines.append(line)
                started.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    started.wait(60)
    t.server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    status, _ = health_latency(t.port, timeout=2)
    tally.check("SIGTERM: new connections are refused", status == 0, status)
    streamer.join(60)
    tally.check("SIGTERM: the stream in flight finishes", "data: [DONE]" in lines, lines[-3:])
    try:
        code = t.server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    tally.check("SIGTERM: exit 0 after the drain", code == 0, code)
