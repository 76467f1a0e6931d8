"""A shadowed stream relays identically whatever the upstream's SSE line ends (LF from
llama-server, CRLF from sse-starlette servers such as llama-cpp-python's, a lone CR): chunks arrive
as they are sent, nothing the client did not ask for leaks, and the job is scored."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest

from kvproxy import sse
from kvproxy.app import create_app
from kvproxy.config import Settings
from kvproxy.deployments.build import build_deployments
from kvproxy.deployments.spec import ProxyConfig
from tests.conftest import serve_in_thread, wait_for
from tests.fault_servers import llama_fake

PACE = 0.15  # seconds between the fake's events


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_shadowed_stream_relays_the_same_for_every_line_ending(newline: bytes) -> None:
    with llama_fake(newline=newline, pace=PACE) as primary, llama_fake() as reference:
        spec: dict[str, Any] = {
            "model": "m",
            "primary": {"urls": [primary.url]},
            "reference": {"urls": [reference.url]},
            "shadow_rate": 0,
            "top_k": 2,
            "primary_logprobs": True,
        }
        app = create_app(build_deployments(ProxyConfig(deployments=[spec]), Settings()))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
            arrivals: list[tuple[float, bytes]] = []
            start = time.monotonic()
            with client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"X-KVProxy-Shadow": "force"}
            ) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_raw():
                    arrivals.append((time.monotonic() - start, chunk))
            decoder = sse.SSEDecoder()
            events = decoder.feed(b"".join(c for _, c in arrivals)) + decoder.close()
            data = [e.data for e in events]
            assert data[-1] == sse.DONE_DATA
            chunks = [orjson.loads(d) for d in data[:-1] if d is not None]
            assert [c["choices"][0]["delta"].get("content") for c in chunks[:3]] == [" w0", " w1", " w2"]
            assert all("logprobs" not in c["choices"][0] for c in chunks if c["choices"])  # not asked
            assert all("usage" not in c for c in chunks)  # kvproxy asked for it, not the client
            assert all(e.newline == newline for e in events)  # the upstream's framing is kept
            # live: the events came over the whole stream's time, not all at once at its end
            first_content = next(t for t, c in arrivals if b"w0" in c)
            last_content = next(t for t, c in arrivals if b"w2" in c)
            assert last_content - first_content >= 1.5 * PACE, arrivals
            assert wait_for(
                lambda: client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]["scored"] == 1,
                timeout=10,
            ), client.get("/kvproxy/v1/status").json()["deployments"][0]["shadow"]
