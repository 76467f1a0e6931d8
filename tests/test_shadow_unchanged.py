"""Issue 25, finding 6: a shadowed request reaches a llama-server primary exactly as the unshadowed one.

A real llama-server on its defaults (Jinja on; the bundled Gemma has no template, so its ChatML
fallback), reached through a loopback forwarder that records every request body the proxy sends it.
Three deployments share that primary, each at shadow rate 1.0 (``X-KVProxy-Shadow: skip`` makes the
unshadowed twin of each request):

* ``exact``: a ``kvproxy backend`` reference (exact scoring). Shadowed bodies equal unshadowed ones
  byte for byte, for chat, streamed or not, with tools and a stream, for completions and for the
  Responses API; the answers are the same; the jobs are scored from the answer's text re-tokenized.
* ``topk``: a plain llama-server reference with ``primary_logprobs = true`` (the top-K estimator's
  opt-in). It adds logprobs, but never with tools + stream (llama-server answered that with a 400):
  that request is served and its job skipped, counted as ``logprobs_refused``.
* ``topk-off``: the same reference without the opt-in: bodies unchanged, jobs skipped as
  ``logprobs_off``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from kvproxy.corpus import english_text
from tests.conftest import RunningServer, start_server, stop_server
from tests.forwarder import RecordingForwarder, recording
from tests.llama_servers import start_llama_server

SKIP, FORCE = {"X-KVProxy-Shadow": "skip"}, {"X-KVProxy-Shadow": "force"}
PROMPT = " ".join(english_text().split()[:40])
MESSAGES = [{"role": "user", "content": PROMPT}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
GEN = {"max_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def stack(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("unchanged")
    primary = start_llama_server(gemma_path, tmp, "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", jinja=True)
    f16 = start_llama_server(gemma_path, tmp, "-fa", "on", "-np", "1", "--swa-full", jinja=True)
    backend = start_server(
        *("-ctk", "q4_0", "-ctv", "q4_0", "--reference-cache-type", "f16", "--ctx-size", "2048"),
        command="backend",
    )
    proxy: RunningServer | None = None
    try:
        with recording(int(primary.url.rsplit(":", 1)[1])) as rec:
            config = tmp / "deployments.toml"
            kv = 'cache_type_k = "q4_0", cache_type_v = "q4_0"'
            config.write_text(f"""
[[deployments]]
model = "exact"
shadow_rate = 1.0
primary = {{ urls = ["{rec.url}"], {kv} }}
reference = {{ urls = ["{backend.base_url}"] }}

[[deployments]]
model = "topk"
shadow_rate = 1.0
primary_logprobs = true
primary = {{ urls = ["{rec.url}"], {kv} }}
reference = {{ urls = ["{f16.url}"] }}

[[deployments]]
model = "topk-off"
shadow_rate = 1.0
primary = {{ urls = ["{rec.url}"], {kv} }}
reference = {{ urls = ["{f16.url}"] }}
""")
            proxy = start_server("--config", str(config))
            yield {"proxy": proxy, "recorder": rec}
    finally:
        if proxy is not None:
            stop_server(proxy)
        stop_server(backend)
        for server in (primary, f16):
            server.process.terminate()
            server.process.wait(timeout=30)


def sent_bodies(rec: RecordingForwarder, path: str, model: str) -> list[bytes]:
    """The bodies the proxy sent the primary on ``path`` for ``model``, in order."""
    return [
        body
        for method, p, body in rec.requests()
        if method == "POST" and p == path and orjson.loads(body).get("model") == model
    ]


def post(proxy: RunningServer, path: str, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=proxy.base_url, timeout=120) as client:
        resp = client.post(path, json=body, headers=headers)
        assert resp.status_code == 200, resp.text
        return resp


def answer_text(resp: httpx.Response, stream: bool) -> str:
    """The generated text of a chat, completion or Responses answer, streamed or not."""
    if not stream:
        data = resp.json()
        if "output" in data:
            return str(data["output"][0]["content"][0]["text"])
        choice = data["choices"][0]
        return str(choice.get("text") or (choice.get("message") or {}).get("content") or "")
    text = []
    lines = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ")]
    assert lines, resp.text
    for line in lines:
        if line == "[DONE]":
            continue
        event = orjson.loads(line)
        if event.get("type") == "response.output_text.delta":
            text.append(event["delta"])
        for choice in event.get("choices") or []:
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def status(proxy: RunningServer) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{proxy.base_url}/kvproxy/v1/status", timeout=30).json()
    return {d["name"]: d for d in data["deployments"]}


def settled(proxy: RunningServer, timeout: float = 300) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(proxy)
        shadows = [d["shadow"] for d in st.values()]
        if all(s["queued"] == 0 and s["in_flight"] == 0 for s in shadows) and all(
            s["sampled"] == s["scored"] + s["failed"] + s["dropped"] for s in shadows
        ):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def metric(proxy: RunningServer, name: str, labels: dict[str, str]) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in httpx.get(f"{proxy.base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels}")


CASES = {
    "chat": ("/v1/chat/completions", "/v1/chat/completions", {"messages": MESSAGES, **GEN}),
    "chat-stream": (
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"messages": MESSAGES, "stream": True, **GEN},
    ),
    "chat-tools-stream": (
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"messages": MESSAGES, "tools": TOOLS, "stream": True, **GEN},
    ),
    "chat-tools": (
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"messages": MESSAGES, "tools": TOOLS, **GEN},
    ),
    "completion": ("/v1/completions", "/v1/completions", {"prompt": PROMPT, **GEN}),
    "completion-stream": ("/v1/completions", "/v1/completions", {"prompt": PROMPT, "stream": True, **GEN}),
    "responses-stream": (
        "/v1/responses",
        "/v1/chat/completions",
        {"input": PROMPT, "stream": True, "max_output_tokens": 16, "temperature": 0},
    ),
}


def test_exact_scoring_sends_shadowed_requests_unchanged(stack: dict[str, Any]) -> None:
    proxy, rec = stack["proxy"], stack["recorder"]
    before = settled(proxy)["exact"]["shadow"]
    for name, (route, upstream, extra) in CASES.items():
        body = {"model": "exact", **extra}
        plain = post(proxy, route, body, SKIP)
        shadowed = post(proxy, route, body, FORCE)
        *_, sent_plain, sent_shadowed = sent_bodies(rec, upstream, "exact")
        assert sent_shadowed == sent_plain, name  # byte for byte: no logprobs, no usage, nothing
        # the answers: whole, and alike in shape (not in text: the same greedy request to this
        # llama-server twice can differ, its prompt cache and slots change the numerics)
        stream = bool(extra.get("stream"))
        for resp in (plain, shadowed):
            answer_text(resp, stream)
            if stream:
                last = resp.text.rstrip().rsplit("\n", 1)[-1]
                assert last == "data: [DONE]" or "response.completed" in last or "response.incomplete" in last
        assert sorted(shadowed.headers.keys()) == sorted(plain.headers.keys()), name
    after = settled(proxy)["exact"]["shadow"]
    sampled = after["sampled"] - before["sampled"]
    scored = after["scored"] - before["scored"]
    assert sampled == len(CASES) and after["failed"] == before["failed"], after
    # the answers' text re-tokenized: every job scored but where the text cannot stand for the
    # tokens (tool calls, or a count that does not match), and then skipped by name
    skipped = {k: v - before["skipped"][k] for k, v in after["skipped"].items()}
    assert scored + sum(skipped.values()) == sampled, after
    assert scored >= len(CASES) - 2, after
    assert set(k for k, v in skipped.items() if v) <= {"tool_calls", "retokenize_mismatch"}, skipped
    assert after["token_ids"].get("retokenized", 0) - before["token_ids"].get("retokenized", 0) == scored
    assert "logprobs" not in after["token_ids"]
    assert settled(proxy)["exact"]["estimator"] == "exact"


def test_top_k_never_breaks_tools_with_a_stream(stack: dict[str, Any]) -> None:
    """llama-server refuses logprobs with tools + stream: the opted-in top-K deployment does not ask
    for them there; the request is served and the job skipped, counted."""
    proxy, rec = stack["proxy"], stack["recorder"]
    skipped = metric(
        proxy, "kvproxy_shadow_skipped_total", {"deployment": "topk", "reason": "logprobs_refused"}
    )
    route, upstream, extra = CASES["chat-tools-stream"]
    body = {"model": "topk", **extra}
    plain = post(proxy, route, body, SKIP)
    shadowed = post(proxy, route, body, FORCE)
    *_, sent_plain, sent_shadowed = sent_bodies(rec, upstream, "topk")
    assert sent_shadowed == sent_plain
    assert plain.text.rstrip().endswith("[DONE]") and shadowed.text.rstrip().endswith("[DONE]")
    settled(proxy)
    after = metric(
        proxy, "kvproxy_shadow_skipped_total", {"deployment": "topk", "reason": "logprobs_refused"}
    )
    assert after == skipped + 1
    # without tools the opt-in asks for the top 20 and the job is scored (top-20 estimator)
    scored = status(proxy)["topk"]["shadow"]["scored"]
    chat = post(proxy, "/v1/chat/completions", {"model": "topk", **CASES["chat"][2]}, FORCE)
    assert "logprobs" not in chat.json()["choices"][0]  # asked by kvproxy, not the client
    asked = orjson.loads(sent_bodies(rec, "/v1/chat/completions", "topk")[-1])
    assert asked["logprobs"] is True and asked["top_logprobs"] == 20
    st = settled(proxy)["topk"]
    assert st["shadow"]["scored"] == scored + 1 and st["estimator"] == "top-20"


def test_top_k_without_the_opt_in_changes_nothing_and_counts_the_skip(stack: dict[str, Any]) -> None:
    proxy, rec = stack["proxy"], stack["recorder"]
    labels = {"deployment": "topk-off", "reason": "logprobs_off"}
    skipped = metric(proxy, "kvproxy_shadow_skipped_total", labels)
    body = {"model": "topk-off", **CASES["chat-stream"][2]}
    post(proxy, "/v1/chat/completions", body, SKIP)
    shadowed = post(proxy, "/v1/chat/completions", body, FORCE)
    *_, sent_plain, sent_shadowed = sent_bodies(rec, "/v1/chat/completions", "topk-off")
    assert sent_shadowed == sent_plain
    assert shadowed.text.rstrip().endswith("[DONE]")
    settled(proxy)
    assert metric(proxy, "kvproxy_shadow_skipped_total", labels) == skipped + 1


def test_the_cost_of_primary_logprobs_is_said_where_they_are_on(stack: dict[str, Any]) -> None:
    """Finding 7: the opt-in's measured cost is in the start-up banner and the log; a top-K
    deployment without it says that its jobs are skipped."""
    out = "".join(stack["proxy"].output)
    banner = [line for line in out.splitlines() if "top-20 logprobs (primary_logprobs)" in line]
    assert len(banner) == 2, out  # the banner's line and the log line, for `topk` only
    assert all("inter-token latency" in line and "H100" in line for line in banner)
    assert "deployment topk:" in out and "deployment topk-off: the reference is a plain llama-server" in out
    assert "shadowed requests reach the primary unchanged" in out  # `exact` and `topk-off`
