"""A forced tool call through the proxy is replayed as it was served (issue 28).

For ``tool_choice: required`` the proxy renders the chat with the primary's ``/apply-template`` and
sends the text to its ``/v1/completions`` with kvproxy's Hermes grammar
(kvproxy.serving.forced_tools). A raw prompt has no message spans, so llama-server cuts its batch
only 4 + n_ubatch and 4 tokens before the end, never at a user message: the shadow job carries the
prompt as ``{"prompt": ...}`` and the replay must not model message cuts either. Here a q4_0
llama-server started with kvproxy's Gemma template (``kvproxy llama-server-args``) serves one forced
call of the bundled Gemma 3 270M through the proxy, and ``kvproxy backend --score-path decode`` with
the same KV config replays it: the served divergence (the primary's top-20 against the replay's
logprobs of the same tokens) must read about 0. With message cuts modelled it would not: the prompt
below has a system message and two user turns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from kvproxy.cli.llama_args import template_file
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import llama_servers
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

FORCE = {"X-KVProxy-Shadow": "force"}
THREADS = ("-t", str(THREADS_N))
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {"name": "weather", "description": "The weather.", "parameters": CITY},
}
MESSAGES = [
    {"role": "system", "content": "You are a careful assistant. Use the tools you are given."},
    {"role": "user", "content": "I am planning a trip to Norway next week, mostly the west coast."},
    {"role": "assistant", "content": "That sounds lovely. Which city do you start in?"},
    {"role": "user", "content": "Bergen first, then Oslo. What will the weather be like in Bergen?"},
]


@pytest.fixture(scope="module")
def stack(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("forced")
    template = template_file(gemma_path, tmp / "templates")
    assert template is not None  # the bundled GGUF has none: kvproxy's Gemma template with tools
    args = ("-np", "1", "-fa", "on", "-ctk", "q4_0", "-ctv", "q4_0", *THREADS)
    with llama_servers(gemma_path, tmp, (*args, "--chat-template-file", str(template)), jinja=True) as (q4,):
        backend = start_server(
            "--score-path", "decode", "--ctx-size", "2048", "--threads", str(THREADS_N),
            "-ctk", "q4_0", "-ctv", "q4_0", "--reference-cache-type", "f16",
            command="backend",
        )  # fmt: skip
        try:
            config = tmp / "deployments.toml"
            config.write_text(f"""
[[deployments]]
model = "q4_0"
shadow_rate = 0
primary_logprobs = true
primary = {{ urls = ["{q4.url}"], cache_type_k = "q4_0", cache_type_v = "q4_0" }}
reference = {{ urls = ["{backend.base_url}"] }}
""")
            proxy = start_server("--config", str(config))
            try:
                yield proxy
            finally:
                stop_server(proxy)
        finally:
            stop_server(backend)


def _consistency(proxy: RunningServer) -> tuple[dict[str, Any], dict[str, Any]]:
    data = httpx.get(f"{proxy.base_url}/kvproxy/v1/status", timeout=30).json()
    d = next(d for d in data["deployments"] if d["name"] == "q4_0")
    return d["shadow"], d["replica_consistency"]


@pytest.mark.slow
def test_a_forced_call_is_replayed_as_served(stack: RunningServer) -> None:
    _, before = _consistency(stack)
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=300)
    out = client.chat.completions.create(  # type: ignore[call-overload]
        model="q4_0",
        messages=MESSAGES,
        tools=[TOOL],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
        extra_headers=FORCE,
    )
    call = (out.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "weather" and out.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    produced = out.usage.completion_tokens
    deadline = time.monotonic() + 300
    while True:
        shadow, after = _consistency(stack)
        if (
            shadow["in_flight"] == 0
            and shadow["queued"] == 0
            and shadow["sampled"] == (shadow["scored"] + shadow["failed"] + shadow["dropped"])
        ):
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert shadow["scored"] == 1, (shadow, "".join(stack.output)[-3000:])
    n = after["compared_positions"] - before["compared_positions"]
    assert n == produced, (shadow, "".join(stack.output)[-3000:])
    total = (
        after["mean_divergence"] * after["compared_positions"]
        - (before["mean_divergence"] or 0) * (before["compared_positions"])
    )
    print(f"\nforced call: {out.usage.prompt_tokens} prompt tokens, served vs replay {total / n:.2e}")
    assert total / n < 1e-4
