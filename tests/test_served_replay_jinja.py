"""The production path replays a chat the way llama-server served it with Jinja templates on (its
default; issue 27).

With Jinja on, llama-server knows where each message of a chat starts (the template's message
delimiters) and cuts the prompt batch at user-message starts as well as 4 + n_ubatch and 4 tokens
before the prompt's end (tools/server/server-context.cpp). A replay that does not cut there scores
other rows than the served ones. Here real llama-servers on their defaults (Jinja on; the bundled
Gemma 3 270M has no template, so ChatML) serve multi-turn chats through the proxy, one stream,
``-np 1``, and ``kvproxy backend --score-path decode`` holding each primary's KV config replays them:
the served divergence (the coarse KL between the primary's top-20 and the replay's logprobs of the
same tokens, ``replica_consistency`` in the status) must read about 0, as it does with --no-jinja.

The real weights, not tests/tiny_gemma3.py: on the tiny model (2026-12-07) the module took 16 s
instead of 85, but a replay with the wrong micro-batch (the f16-b64 scoring server without
``--batch-size 16``, 1.2e-3 on Gemma 3 270M) read 1.3e-5 there (the same served-vs-replay coarse
top-20 divergence, decode-path replay), under the 1e-4 bound: the test
would no longer tell a wrong replay from a right one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvproxy.corpus import english_text
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import llama_servers
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

FORCE = {"X-KVProxy-Shadow": "force"}
THREADS = (
    "-t",
    str(THREADS_N),
)  # the scoring servers get the same: CPU decode rows past 512 cells depend on it


def words(start: int, n: int) -> str:
    return " ".join(english_text().split()[start : start + n])


def chat(system: str, *turns: str) -> list[dict[str, str]]:
    """A system message, then user and assistant turns in alternation (ending with a user turn)."""
    roles = ("user", "assistant")
    return [{"role": "system", "content": system}] + [
        {"role": roles[i % 2], "content": text} for i, text in enumerate(turns)
    ]


# system, user, assistant, user: llama-server cuts at both user starts and 4 tokens before the end
SHORT = chat(
    "You are a careful assistant. Answer in plain English.",
    words(0, 40),
    "I read it. " + words(200, 25),
    "Summarise the terms above in one sentence: " + words(400, 15),
)
# about 1,100 tokens, three user turns: the 4 + 512 cut falls inside the first user message, the
# call after it is longer than a micro-batch, and the middle user start is no cut (a checkpoint exists)
LONG = chat(
    "You read legal text closely and say what it means for a developer.",
    words(500, 430),
    "Here is what I found. " + words(1000, 150),
    words(1200, 120),
    "Noted. " + words(1400, 40),
    "What should I check first? " + words(1500, 40),
)


@pytest.fixture(scope="module")
def stack(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("jinja")
    q4 = ("-ctk", "q4_0", "-ctv", "q4_0")
    with llama_servers(
        gemma_path,
        tmp,
        ("-np", "1", "-fa", "on", *THREADS),
        ("-np", "1", "-fa", "on", *q4, *THREADS),
        ("-np", "1", "-fa", "on", "-b", "64", "-ub", "16", *THREADS),  # calls cut by the batch too
        jinja=True,
    ) as (f16, q4_primary, small):
        common = ("--score-path", "decode", "--ctx-size", "2048", "--threads", str(THREADS_N))
        # the scoring server's micro-batch must be the primary's: it sizes the sliding-window cache
        # (pad(512 + 16) = 768 cells against 1024), and that alone moved f16 rows by 1.2e-3 nats
        backends = [
            start_server(
                *common, "-ctk", kv, "-ctv", kv, "--reference-cache-type", "f16", *extra, command="backend"
            )
            for kv, extra in (("f16", ()), ("q4_0", ()), ("f16", ("--batch-size", "16")))
        ]
        try:
            config = tmp / "deployments.toml"
            config.write_text(f"""
[[deployments]]
model = "f16"
shadow_rate = 0
primary_logprobs = true  # the served top-20, to compare with the replay
primary = {{ urls = ["{f16.url}"], cache_type_k = "f16", cache_type_v = "f16" }}
reference = {{ urls = ["{backends[0].base_url}"] }}

[[deployments]]
model = "q4_0"
shadow_rate = 0
primary_logprobs = true
primary = {{ urls = ["{q4_primary.url}"], cache_type_k = "q4_0", cache_type_v = "q4_0" }}
reference = {{ urls = ["{backends[1].base_url}"] }}

[[deployments]]
model = "f16-b64"
shadow_rate = 0
primary_logprobs = true
reference = {{ urls = ["{backends[2].base_url}"] }}

[deployments.primary]
urls = ["{small.url}"]
cache_type_k = "f16"
cache_type_v = "f16"
batch_size = 64
ubatch_size = 16
""")
            proxy = start_server("--config", str(config))
            try:
                yield proxy
            finally:
                stop_server(proxy)
        finally:
            for b in backends:
                stop_server(b)


def consistency(proxy: RunningServer, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    data = httpx.get(f"{proxy.base_url}/kvproxy/v1/status", timeout=30).json()
    d = next(d for d in data["deployments"] if d["name"] == model)
    return d["shadow"], d["replica_consistency"]


def served_divergence(proxy: RunningServer, model: str, messages: list[dict[str, str]]) -> float:
    """One shadowed chat through the proxy; the mean served-vs-replay divergence of its tokens."""
    _, before = consistency(proxy, model)
    client = openai.OpenAI(base_url=proxy.v1, api_key="unused", max_retries=0, timeout=300)
    out = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        extra_headers=FORCE,  # type: ignore[arg-type]
    )
    produced = out.usage.completion_tokens  # type: ignore[union-attr]
    deadline = time.monotonic() + 300
    while True:
        shadow, after = consistency(proxy, model)
        if (
            shadow["in_flight"] == 0
            and shadow["queued"] == 0
            and shadow["sampled"] == (shadow["scored"] + shadow["failed"] + shadow["dropped"])
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    n = after["compared_positions"] - before["compared_positions"]
    assert n == produced, (shadow, "".join(proxy.output)[-3000:])
    total = (
        after["mean_divergence"] * after["compared_positions"]
        - (before["mean_divergence"] or 0) * (before["compared_positions"])
    )
    print(f"\n{model}: {out.usage.prompt_tokens} prompt tokens, served vs replay {total / n:.2e}")  # type: ignore[union-attr]
    return float(total / n)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["f16", "q4_0"])
def test_a_multi_turn_chat_is_replayed_as_served(stack: RunningServer, model: str) -> None:
    assert served_divergence(stack, model, SHORT) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["f16", "q4_0", "f16-b64"])
def test_a_long_chat_is_replayed_as_served(stack: RunningServer, model: str) -> None:
    """The message cuts with the 4 + n_ubatch cut, micro-batches and (f16-b64) batches of 64."""
    assert served_divergence(stack, model, LONG) < 1e-4
