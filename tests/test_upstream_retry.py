"""An idempotent upstream exchange survives a pooled connection the server closed under it (the race
a fresh-clone CI run hit against llama-server: "Can not write request body"), and still fails on a
server that keeps dropping it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from kvproxy.upstream.llama_server import LlamaServerPrimary
from kvproxy.upstream.replicas import Replica, ReplicaPool, Timeouts, UpstreamFailure

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _server(drops: int) -> tuple[asyncio.Server, list[int]]:
    """Drops the first ``drops`` requests (closes the socket after reading them), answers the rest."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                seen[0] += 1
                if seen[0] <= drops:
                    writer.close()
                    return
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


@pytest.mark.parametrize(("drops", "answered"), [(0, True), (1, True), (2, False)])
def test_one_retry_on_a_dropped_connection(drops: int, answered: bool) -> None:
    async def main() -> None:
        server, seen = await _server(drops)
        port = server.sockets[0].getsockname()[1]
        replica = Replica(f"http://127.0.0.1:{port}", Timeouts(1, 2, 5))
        try:
            if answered:
                assert await replica.post("/tokenize", b"{}") == (200, b"{}")
                assert seen[0] == drops + 1
            else:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await replica.post("/tokenize", b"{}")
                assert seen[0] == 2  # once more, not forever
        finally:
            await replica.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize(("drops", "answered"), [(0, True), (1, True), (2, False)])
def test_a_client_request_survives_one_dropped_connection(drops: int, answered: bool) -> None:
    """The client's own request (the relay's send) gets the same one retry: a fresh-clone CI run saw
    llama-server drop a pooled connection under a chat request, and the client got a 502 for it. A
    second drop is the client's 502 and ejects the replica; one that the retry covered does neither."""

    async def main() -> None:
        server, seen = await _server(drops)
        port = server.sockets[0].getsockname()[1]
        pool = ReplicaPool([f"http://127.0.0.1:{port}"], Timeouts(1, 2, 5))
        primary = LlamaServerPrimary(pool, top_k=0)
        try:
            if answered:
                assert await primary.post_json("/v1/chat/completions", b"{}") == b"{}"
                assert seen[0] == drops + 1 and pool.replicas[0].healthy
            else:
                with pytest.raises(UpstreamFailure) as info:
                    await primary.post_json("/v1/chat/completions", b"{}")
                assert info.value.status == 502 and info.value.code == "upstream_unavailable"
                assert seen[0] == 2 and not pool.replicas[0].healthy  # once more, not forever
            assert pool.replicas[0].outstanding == 0
        finally:
            await pool.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
