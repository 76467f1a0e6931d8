"""The real Qwen3.5 and Gemma 4 chat templates, against llama-server's own handling of them.

The templates are the pinned llama.cpp's (``models/templates/Qwen3.5-4B.jinja`` and
``google-gemma-4-31B-it.jinja``), written into the tiny qwen35moe and gemma4 models as their
``tokenizer.chat_template``; a real llama-server runs on the same model with ``--jinja
--chat-template-file``. For every conversation below, kvproxy's prompt must equal llama-server's
``/apply-template`` text and tokenize to the same ids as its ``/tokenize``. The reasoning split is
checked on llama-server's own parser: a final assistant message with only ``reasoning_content`` is
continued by llama-server inside the reasoning block, so its answer is its parse of
``<generation prompt><that text><one generated token>``; kvproxy must split the same text the same
way, streamed and not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import Settings
from kvproxy.model.chat_template import ChatTemplate
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.reasoning import GEMMA4, QWEN, ReasoningFormat, ReasoningSplitter, split_reasoning
from kvproxy.protocol import ChatCompletionRequest
from tests.arch_models import tiny_model, with_chat_template
from tests.llama_servers import LlamaServer, start_llama_server
from tests.llama_tools import llama_bin

TEMPLATES = {"qwen35moe": "Qwen3.5-4B.jinja", "gemma4": "google-gemma-4-31B-it.jinja"}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [{"role": "user", "content": "Hi there"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ],
    "assistant reasoning in the history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "and 3+3?"},
    ],
    "thinking written into the content": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ],
    "developer role": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "content parts": [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    ],
    "whitespace": [
        {"role": "user", "content": "  padded  \n"},
        {"role": "assistant", "content": "  answer \n"},
        {"role": "user", "content": "ok"},
    ],
    "a final assistant turn is continued": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "The answer"},
    ],
    "continued with its reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "The answer", "reasoning_content": "Simple."},
    ],
    "continued inside its reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "Let me see"},
    ],
}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, EmbeddedBackend, LlamaServer]]:
    arch = str(request.param)
    template_file = llama_bin().parent / "src" / "models" / "templates" / TEMPLATES[arch]
    tmp = tmp_path_factory.mktemp(arch)
    model = with_chat_template(tiny_model(arch), template_file.read_text(), tmp / f"{arch}.gguf")
    srv = start_llama_server(model, tmp, "--jinja", "--chat-template-file", str(template_file))
    backend = EmbeddedBackend(Settings(model=model, ctx_size=256, threads=1), read_model_info(model))
    asyncio.run(backend.load())
    try:
        yield arch, backend, srv
    finally:
        srv.kill()
        backend.close()


def _kvproxy_prompt(backend: EmbeddedBackend, body: dict[str, Any]) -> str:
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    return backend.chat_template.render(
        [m.template_dict() for m in req.messages], variables=req.chat_template_kwargs
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_equals_llama_server_apply_template(
    served: tuple[str, EmbeddedBackend, LlamaServer], name: str
) -> None:
    _, backend, srv = served
    body = {"messages": CONVERSATIONS[name]}
    theirs = httpx.post(f"{srv.url}/apply-template", json=body, timeout=30).json()["prompt"]
    assert _kvproxy_prompt(backend, body) == theirs
    # and the same token ids: kvproxy adds the BOS that the rendered text leaves out, as llama-server
    tokenized = {"content": theirs, "add_special": True, "parse_special": True}
    ids = httpx.post(f"{srv.url}/tokenize", json=tokenized, timeout=30).json()["tokens"]
    assert backend.tokenize(_kvproxy_prompt(backend, body), add_bos=True) == ids


def test_thinking_can_be_turned_off(served: tuple[str, EmbeddedBackend, LlamaServer]) -> None:
    _, backend, srv = served
    body = {"messages": CONVERSATIONS["system"], "chat_template_kwargs": {"enable_thinking": False}}
    theirs = httpx.post(f"{srv.url}/apply-template", json=body, timeout=30).json()["prompt"]
    mine = _kvproxy_prompt(backend, body)
    assert mine == theirs
    assert mine != _kvproxy_prompt(backend, {"messages": CONVERSATIONS["system"]})


def test_two_final_assistant_messages_are_refused(served: tuple[str, EmbeddedBackend, LlamaServer]) -> None:
    from kvproxy.model.chat_template import ChatTemplateError

    _, backend, _ = served
    msgs = [*CONVERSATIONS["multi-turn"][:3], {"role": "assistant", "content": "more"}]
    with pytest.raises(ChatTemplateError, match="2 or more assistant messages"):
        backend.chat_template.render(msgs)


RAW_OUTPUTS = {
    QWEN: [
        "thinking here\n</think>\n\nThe answer",
        "  spaced \n</think>\n\n\n  answer  ",
        "no closing tag at all",
        "a</think>b",
        "line\n</think>",
        "</think>only content",
    ],
    GEMMA4: [
        "  R1 \n<channel|>\n\n  C1 ",
        "R<channel|>C<|channel>thought\nR2<channel|>D",
        "no closing tag",
        "R<channel|>C<channel|>E",
        "R<channel|>C<|channel>x<|channel>thought R3<channel|>F",
        "<channel|>straight to content",
    ],
}


def _llama_server_split(srv: LlamaServer, raw: str, stream: bool) -> tuple[str, str, str]:
    """llama-server's (reasoning, content) of the continued text, and the token it generated."""
    body = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": raw},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "stream": stream,
        "logprobs": not stream,
    }
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    if not stream:
        choice = r.json()["choices"][0]
        m, generated = choice["message"], choice["logprobs"]["content"][0]["token"]
        return m.get("reasoning_content") or "", m.get("content") or "", generated
    reasoning = content = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                reasoning += choice["delta"].get("reasoning_content") or ""
                content += choice["delta"].get("content") or ""
    return reasoning, content, ""


def test_reasoning_split_equals_llama_server(served: tuple[str, EmbeddedBackend, LlamaServer]) -> None:
    _, backend, srv = served
    template: ChatTemplate = backend.chat_template
    fmt = template.reasoning
    assert fmt is not None
    for raw in RAW_OUTPUTS[fmt]:
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": raw},
        ]
        tail = template.render_chat(messages).generation_prompt
        reasoning, content, generated = _llama_server_split(srv, raw, stream=False)
        theirs = (reasoning, content)
        # llama-server parsed the continued text plus its one generated token: so does kvproxy,
        # at once and a character at a time
        assert tail.endswith(raw)
        assert split_reasoning(fmt, tail, generated) == theirs, raw
        assert _streamed(fmt, tail[: len(tail) - len(raw)], raw + generated) == theirs, raw
        assert _llama_server_split(srv, raw, stream=True)[:2] == theirs


def _streamed(fmt: ReasoningFormat, tail: str, text: str) -> tuple[str, str]:
    splitter = ReasoningSplitter(fmt, tail)
    reasoning = content = ""
    for ch in text:  # one character at a time: tags arrive split
        r, c = splitter.push(ch)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return reasoning + r, content + c


def test_serve_answers_with_reasoning_content(
    served: tuple[str, EmbeddedBackend, LlamaServer], tmp_path: Path
) -> None:
    """End to end through kvproxy serve: a reply continued inside its reasoning keeps that
    reasoning apart from the content, streamed and not, as llama-server answers it."""
    from openai import OpenAI

    from tests.conftest import start_server, stop_server

    _, backend, _ = served
    server = start_server(
        "--model", str(backend.info.path), "--alias", "m", "-c", "256", "--shadow-rate", "0"
    )
    try:
        client = OpenAI(base_url=server.v1, api_key="unused")
        messages: Any = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "Let me see"},
        ]
        out = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
        message = out.choices[0].message.model_dump()
        assert message["reasoning_content"].startswith("Let me see")
        reasoning = content = ""
        for chunk in client.chat.completions.create(
            model="m", messages=messages, max_tokens=4, temperature=0, stream=True
        ):
            for choice in chunk.choices:
                d = choice.delta.model_dump()
                reasoning += d.get("reasoning_content") or ""
                content += d.get("content") or ""
        assert (reasoning, content) == (message["reasoning_content"], message["content"] or "")
    finally:
        stop_server(server)


@pytest.mark.parametrize("fmt", [QWEN, GEMMA4], ids=lambda f: f.name)
def test_the_split_does_not_depend_on_where_the_stream_is_cut(fmt: ReasoningFormat) -> None:
    """Pure: every raw output, cut into pieces at every pair of points, splits as it does whole."""
    tail = fmt.assistant_prefix + ("<think>\n" if fmt is QWEN else "")
    for raw in RAW_OUTPUTS[fmt]:
        whole = split_reasoning(fmt, tail, raw)
        for i in range(len(raw) + 1):
            for j in range(i, len(raw) + 1, 3):
                splitter = ReasoningSplitter(fmt, tail)
                got = [
                    splitter.push(raw[:i]),
                    splitter.push(raw[i:j]),
                    splitter.push(raw[j:]),
                    splitter.finish(),
                ]
                assert ("".join(g[0] for g in got), "".join(g[1] for g in got)) == whole, (raw, i, j)
