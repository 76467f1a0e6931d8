"""Qwen3.5's XML-parameter and Gemma 4's tool-call formats in embedded mode beside a real llama-server
(the pinned llama.cpp, ``--jinja``).

As tests/test_tools_side_by_side.py does for the Hermes format: the bundled Gemma 3 270M carries each
template (llama.cpp's own ``models/templates/Qwen3.5-4B.jinja`` and ``google-gemma-4-31B-it.jinja``)
as its ``tokenizer.chat_template``, which kvproxy reads, and llama-server is given the same template
with ``--chat-template-file``. kvproxy's prompt for each conversation (tools described, earlier calls
and results in the history) must equal llama-server's ``/apply-template``; with ``tool_choice:
required`` at temperature 0 both must answer with a valid call, and with one tool the same call (name
and parsed arguments).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from kvproxy.model.chat_template import ChatTemplate
from tests.arch_models import with_chat_template
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import LlamaServer, start_llama_server
from tests.llama_tools import llama_bin
from tests.test_tools_side_by_side import (
    ASK,
    CONVERSATIONS,
    NO_THINKING,
    UNIT,
    WEATHER,
    _apply_template,
    _kvproxy_prompt,
    _llama_server_call,
)

TEMPLATES = {"qwen3.5": "Qwen3.5-4B.jinja", "gemma4": "google-gemma-4-31B-it.jinja"}
COUNT = {
    "type": "function",
    "function": {
        "name": "set_count",
        "description": "How many to show",
        "parameters": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "label": {"type": "string"}},
            "required": ["count"],
        },
    },
}
Served = tuple[str, LlamaServer, RunningServer]


def _template_text(name: str) -> str:
    return (llama_bin().parent / "src" / "models" / "templates" / TEMPLATES[name]).read_text()


@pytest.fixture(scope="module", params=list(TEMPLATES))
def served(
    request: pytest.FixtureRequest, gemma_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    name = str(request.param)
    tmp = tmp_path_factory.mktemp(f"{name}-tools")
    text = _template_text(name)
    template_file = tmp / "template.jinja"
    template_file.write_text(text)
    model = with_chat_template(gemma_path, text, tmp / f"gemma-{name}-template.gguf")
    srv = start_llama_server(model, tmp, "--chat-template-file", str(template_file), jinja=True)
    kv = start_server("--model", str(model), "--alias", "m", "-c", "1024", "--shadow-rate", "0")
    try:
        yield name, srv, kv
    finally:
        srv.kill()
        stop_server(kv)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_prompt_equals_llama_server(served: Served, conversation: str) -> None:
    name, srv, _ = served
    template = ChatTemplate(_template_text(name), "gguf", "<bos>", "<eos>", add_bos=True)
    body = {**CONVERSATIONS[conversation], "chat_template_kwargs": NO_THINKING}
    mine = _kvproxy_prompt(template, body)
    assert mine == _apply_template(srv, body)
    if conversation != "tool_choice none":
        assert "get_weather" in mine


@pytest.mark.parametrize(
    "tools", [[UNIT], [COUNT], [WEATHER, UNIT]], ids=["enum string", "integer and string", "two tools"]
)
def test_required_call_beside_llama_server(served: Served, tools: list[dict[str, Any]]) -> None:
    """``tool_choice: required`` at temperature 0, 60 tokens. kvproxy's answer is the forced call
    (parsed, or cut by the limit and returned as its text). Gemma 4: llama-server's answer is a call
    (of the same function where there is one tool), and where both finish, the same arguments.
    Qwen3.5: the pinned llama-server answers in text without a call on this model (what
    docs/function-calling.md records)."""
    name, srv, kv = served
    body: dict[str, Any] = {
        "model": "m",
        "messages": [ASK],
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 60,
        "chat_template_kwargs": NO_THINKING,
    }
    theirs = _llama_server_call(srv, body)
    client = OpenAI(base_url=kv.v1, api_key="unused", max_retries=0, timeout=300)
    mine = client.chat.completions.create(
        **{k: v for k, v in body.items() if k != "chat_template_kwargs"},
        extra_body={"chat_template_kwargs": NO_THINKING},
    )
    names = {t["function"]["name"] for t in tools}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    their_calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in theirs["message"].get("tool_calls") or []
    ]
    choice = mine.choices[0]
    my_calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    opener = "<|tool_call>call:" if name == "gemma4" else "<tool_call>\n<function="
    if my_calls:
        assert choice.finish_reason == "tool_calls" and my_calls[0][0] in names
        if name == "qwen3.5":  # Gemma 4's grammar takes any dict (llama.cpp's too)
            jsonschema.validate(json.loads(my_calls[0][1]), schemas[my_calls[0][0]])
        chosen = my_calls[0][0]
    else:  # cut inside the call: its text, which the grammar made start as a call
        assert choice.finish_reason == "length" and (choice.message.content or "").startswith(opener), choice
        chosen = next(n for n in names if choice.message.content.startswith(f"{opener}{n}"))  # type: ignore[union-attr]
    if name == "qwen3.5":
        assert not their_calls and "<tool_call>" not in (theirs["message"].get("content") or ""), theirs
        return
    assert their_calls and their_calls[0][0] in names, theirs
    if len(tools) == 1:  # with two, the tiny model's greedy pick differed (docs/function-calling.md)
        assert their_calls[0][0] == chosen, (theirs, choice)
    if my_calls and theirs["finish_reason"] == "tool_calls":
        assert json.loads(their_calls[0][1]) == json.loads(my_calls[0][1]), (theirs, choice)
