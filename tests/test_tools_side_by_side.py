"""Function calling in embedded mode beside a real llama-server (the pinned llama.cpp, ``--jinja``).

Hermes ``<tool_call>`` format: the bundled Gemma 3 270M given Qwen3's template (llama.cpp's own
``models/templates/Qwen-Qwen3-0.6B.jinja``) as its ``tokenizer.chat_template`` (a tiny random model's
128-token vocabulary cannot spell the grammar's tags: llama-server cannot start its sampler);
llama-server runs on the same GGUF. kvproxy's prompt for
each conversation (tools described, earlier calls and results in the history) must equal
llama-server's ``/apply-template``; and with ``tool_choice: required`` at temperature 0 both answer
with a call of the function with arguments that match its schema.

Generic format: the bundled Gemma 3 270M with Gemma's published template (as a Gemma GGUF carries
it) given to llama-server as ``--chat-template-file``. With ``tool_choice: none`` kvproxy's generic
rendering equals llama-server's. With ``required`` the pinned llama-server finds no tool syntax in
the template and answers in text (its autoparser needs a template that renders tool calls), where
kvproxy's embedded server (which renders the bundled model's tool turns with its Hermes-style Gemma
template, docs/function-calling.md) forces a call: a difference kept on purpose, checked here so
that a llama.cpp that changes it is noticed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from kvproxy.model.chat_template import GEMMA_TEMPLATE
from kvproxy.protocol import ChatCompletionRequest
from kvproxy.serving.tool_turns import ToolTurn
from tests.arch_models import with_chat_template
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import LlamaServer, start_llama_server
from tests.llama_tools import llama_bin

UNIT = {
    "type": "function",
    "function": {
        "name": "set_unit",
        "description": "Choose the temperature unit",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NO_THINKING = {"enable_thinking": False}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'}
CONVERSATIONS: dict[str, dict[str, Any]] = {
    "tools described": {"messages": [ASK], "tools": [WEATHER, UNIT]},
    "system and tools": {"messages": [{"role": "system", "content": "Be brief."}, ASK], "tools": [WEATHER]},
    "a call and its result": {"messages": [ASK, CALL, RESULT], "tools": [WEATHER]},
    "a call with text, two results": {
        "messages": [
            ASK,
            {
                **CALL,
                "content": "Let me check.",
                "tool_calls": [
                    *CALL["tool_calls"],
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "set_unit", "arguments": '{"unit":"celsius"}'},
                    },
                ],
            },
            RESULT,
            {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
        ],
        "tools": [WEATHER, UNIT],
    },
    "tool_choice none": {"messages": [ASK], "tools": [WEATHER], "tool_choice": "none"},
}


def _kvproxy_prompt(template: Any, body: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    turn = ToolTurn.of(req, template.template)
    messages = [m.template_dict() for m in req.messages]
    variables = req.chat_template_kwargs
    if turn is not None:
        messages, variables = turn.messages(messages), turn.variables(variables)
    return str(template.render(messages, variables=variables))


def _apply_template(srv: LlamaServer, body: dict[str, Any]) -> str:
    r = httpx.post(f"{srv.url}/apply-template", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["prompt"])


# ---- Hermes: Qwen3's template on the bundled Gemma 3 ------------------------------------------


@pytest.fixture(scope="module")
def qwen3(
    gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, LlamaServer, RunningServer]]:
    template_file = llama_bin().parent / "src" / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja"
    tmp = tmp_path_factory.mktemp("qwen3-tools")
    model = with_chat_template(gemma_path, template_file.read_text(), tmp / "gemma-qwen3-template.gguf")
    srv = start_llama_server(model, tmp, jinja=True)
    kv = start_server("--model", str(model), "--alias", "m", "-c", "1024", "--shadow-rate", "0")
    try:
        yield model, srv, kv
    finally:
        srv.kill()
        stop_server(kv)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_hermes_prompt_equals_llama_server(qwen3: tuple[Path, LlamaServer, RunningServer], name: str) -> None:
    from kvproxy.model.chat_template import ChatTemplate

    _, srv, _ = qwen3
    template = ChatTemplate(
        (llama_bin().parent / "src" / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text(),
        "gguf",
        "<bos>",
        "<eos>",
        add_bos=True,
    )
    body = {**CONVERSATIONS[name], "chat_template_kwargs": NO_THINKING}
    mine = _kvproxy_prompt(template, body)
    assert mine == _apply_template(srv, body)
    if name != "tool_choice none":
        assert '"name": "get_weather"' in mine


def _llama_server_call(srv: LlamaServer, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


@pytest.mark.parametrize("tools", [[UNIT], [WEATHER, UNIT]], ids=["one tool", "two tools"])
def test_hermes_required_call_beside_llama_server(
    qwen3: tuple[Path, LlamaServer, RunningServer], tools: list[dict[str, Any]]
) -> None:
    """Both force a call at temperature 0: each must be a valid call, and the same call (name and
    parsed arguments)."""
    _, srv, kv = qwen3
    body: dict[str, Any] = {
        "model": "m",
        "messages": [ASK],
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        # kvproxy's call ends at 30-31 tokens; llama-server's first call is whole by then (it goes
        # on to write more calls until the limit)
        "max_tokens": 40,
        "chat_template_kwargs": NO_THINKING,
    }
    theirs = _llama_server_call(srv, body)
    client = OpenAI(base_url=kv.v1, api_key="unused", max_retries=0, timeout=300)
    mine = client.chat.completions.create(
        **{k: v for k, v in body.items() if k != "chat_template_kwargs"},
        extra_body={"chat_template_kwargs": NO_THINKING},
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    their_calls = theirs["message"].get("tool_calls") or []
    my_calls = mine.choices[0].message.tool_calls or []
    for calls in (
        [(c["function"]["name"], c["function"]["arguments"]) for c in their_calls],
        [(c.function.name, c.function.arguments) for c in my_calls],
    ):
        if calls:  # a tiny model may run out of tokens inside a string (finish_reason length)
            name, arguments = calls[0]
            jsonschema.validate(json.loads(arguments), schemas[name])
    assert my_calls or mine.choices[0].finish_reason == "length"
    if len(tools) == 1 and their_calls and my_calls:
        assert their_calls[0]["function"]["name"] == my_calls[0].function.name == "set_unit"
        assert json.loads(their_calls[0]["function"]["arguments"]) == json.loads(
            my_calls[0].function.arguments
        )


# ---- generic: the bundled Gemma 3 with kvproxy's Gemma template -------------------------------


@pytest.fixture(scope="module")
def gemma_server(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    tmp = tmp_path_factory.mktemp("gemma-tools")
    template = tmp / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    srv = start_llama_server(gemma_path, tmp, "--chat-template-file", str(template), jinja=True)
    try:
        yield srv
    finally:
        srv.kill()


def test_generic_none_renders_as_llama_server(gemma_server: LlamaServer) -> None:
    from kvproxy.model.chat_template import ChatTemplate

    template = ChatTemplate.for_model("gemma3", None, "<bos>", "<eos>", add_bos=True)
    body = {"messages": [ASK], "tools": [WEATHER], "tool_choice": "none"}
    assert _kvproxy_prompt(template, body) == _apply_template(gemma_server, body)
    # with calls read, kvproxy adds the generic format's system text; llama-server adds nothing
    auto = {"messages": [ASK], "tools": [WEATHER]}
    mine = _kvproxy_prompt(template, auto)
    assert "Respond in JSON format" in mine and '"get_weather"' in mine
    assert "Respond in JSON format" not in _apply_template(gemma_server, auto)


def test_generic_required_differs_from_llama_server(gemma_server: LlamaServer, server: RunningServer) -> None:
    body: dict[str, Any] = {
        "model": server.model,
        "messages": [ASK],
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 40,
    }
    theirs = _llama_server_call(gemma_server, body)
    assert not theirs["message"].get("tool_calls"), theirs  # text: no tool syntax in the template
    mine = OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=600).chat.completions.create(
        **body
    )
    calls = mine.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
