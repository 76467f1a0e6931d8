"""Real llama-server processes (built from the pinned llama.cpp) on loopback, for integration tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.llama_tools import llama_bin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def start_llama_server(
    model: Path, log_dir: Path, *args: str, timeout: float = 120, jinja: bool = False
) -> LlamaServer:
    """``llama-server -m MODEL ARGS`` on a free port, waited for until healthy: Gemma's built-in turn
    format without Jinja, or with ``jinja`` llama-server's own default (Jinja on; a GGUF without a
    template, as the bundled Gemma, gets its ChatML fallback unless ARGS give one)."""
    template = () if jinja else ("--no-jinja", "--chat-template", "gemma")
    port = free_port()
    log = log_dir / f"llama-server-{port}.log"
    proc = subprocess.Popen(
        [
            str(llama_bin() / "llama-server"),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            "1",
            "-c",
            "2048",
            # the built-in Gemma turn format: with Jinja on (this llama.cpp's default) a bare name
            # is read as a template whose whole text is "gemma"
            *template,
            "--no-webui",
            # no memory fitting: on the CPU it changes nothing ("no changes needed") but loads the
            # model's metadata and vocabulary once more first, about half of a start-up
            *(() if "-fit" in args or "--fit" in args else ("-fit", "off")),
            *args,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return LlamaServer(url, proc, log)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llama-server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def llama_servers(
    model: Path, log_dir: Path, *configs: tuple[str, ...], jinja: bool = False
) -> Iterator[list[LlamaServer]]:
    servers: list[LlamaServer] = []
    try:
        for args in configs:
            servers.append(start_llama_server(model, log_dir, *args, jinja=jinja))
        yield servers
    finally:
        for s in servers:
            if s.process.poll() is None:
                s.process.terminate()
                try:
                    s.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    s.process.kill()
