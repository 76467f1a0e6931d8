"""A loopback TCP forwarder whose target can be switched: one URL, a backend redeployed behind it
(the way a Kubernetes Service moves to new pods). Switching closes every open connection, so the
next request reaches the new backend."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class Forwarder:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result()
        self.port = self._server.sockets[0].getsockname()[1]

    def switch(self, target_port: int) -> None:
        """Send new connections to ``target_port`` and cut the open ones."""

        async def cut() -> None:
            self.target_port = target_port
            for w in list(self._writers):
                w.close()

        asyncio.run_coroutine_threadsafe(cut(), self._loop).result()

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


@contextlib.contextmanager
def forwarding(target_port: int) -> Iterator[Forwarder]:
    fwd = Forwarder(target_port)
    fwd.start()
    try:
        yield fwd
    finally:
        fwd.stop()


class RecordingForwarder(Forwarder):
    """A forwarder that reads back the HTTP requests its clients sent through it, in the order they
    arrived whole: what the proxy really sent its upstream, after any rewriting. Bodies are taken by
    their content-length (as aiohttp sends them)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._requests: list[tuple[str, str, bytes]] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = bytearray()
        done = self._requests

        class Tap:
            async def read(self, n: int) -> bytes:
                data = await reader.read(n)
                pending.extend(data)
                while (request := _take_request(pending)) is not None:
                    done.append(request)
                return data

        await super()._handle(Tap(), writer)  # type: ignore[arg-type]

    def requests(self) -> list[tuple[str, str, bytes]]:
        """(method, path, body) of every request sent whole so far, in arrival order."""
        return list(self._requests)


def _take_request(buffer: bytearray) -> tuple[str, str, bytes] | None:
    """The first whole request in ``buffer``, taken out of it; None if it has not all come."""
    cut = buffer.find(b"\r\n\r\n")
    if cut < 0:
        return None
    lines = bytes(buffer[:cut]).decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if len(buffer) < cut + 4 + length:
        return None
    body = bytes(buffer[cut + 4 : cut + 4 + length])
    del buffer[: cut + 4 + length]
    return method, path, body


@contextlib.contextmanager
def recording(target_port: int) -> Iterator[RecordingForwarder]:
    fwd = RecordingForwarder(target_port)
    fwd.start()
    try:
        yield fwd
    finally:
        fwd.stop()
