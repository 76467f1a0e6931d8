"""The client matrix (issue 28): real clients, on their defaults where they allow, each against the
embedded server and against the proxy in front of a real llama-server with ``--jinja`` started with
what ``kvproxy llama-server-args`` prints (the README's proxy quick start). Each runs one tool round
trip (a call of the tool, its result sent back, an answer) and one structured output.

One server per mode for the whole matrix (session scope; the embedded one is conftest's ``server``).
With the 270M base model the answers are not wise: what is asserted is the protocol (a call of the
named function whose arguments parse against its schema, the round trip completing, the structured
output parsing into its model). ``tool_choice: required`` is forced by grammar embedded; the pinned
llama-server does not force it (its autoparser lets text come before a call, and the base model
writes text), so in proxy mode the first turn is checked as either a valid call or text, and the
round trip is driven from a call given in the history (docs/clients.md: known differences).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from kvproxy.model.chat_template import ChatTemplate
from tests.conftest import RunningServer, start_server, stop_server
from tests.llama_servers import free_port
from tests.llama_tools import llama_bin
from tests.openai_spec import assert_valid

ROOT = Path(__file__).resolve().parent.parent


class City(BaseModel):
    city: str = Field(max_length=24)


CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {"name": "weather", "description": "The weather in a city.", "parameters": CITY_SCHEMA}
CHAT_TOOL = {"type": "function", "function": TOOL}
RESPONSES_TOOL = {"type": "function", **TOOL, "strict": True}
ASK = "What is the weather in Oslo?"
RESULT = "sunny, 21 C"
ROOM = 48  # tokens: room for a call or a City object (the 16-character cap keeps them short)


class Target:
    """One served model: its base URL, its name, and whether the server forces required calls."""

    def __init__(self, mode: str, v1: str, model: str, upstream: str | None = None) -> None:
        self.mode, self.v1, self.model, self.upstream = mode, v1, model, upstream
        self.forced = mode == "embedded"
        # llama.cpp's JSON grammar lets the base model write up to 20 blanks between tokens, and it
        # does (141 tokens for a City object behind llama-server; kvproxy's grammar allows none)
        self.room = ROOM if self.forced else 200

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=300)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def proxy_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The README's proxy quick start: llama-server with the printed arguments, kvproxy in front."""
    printed = subprocess.run(
        [sys.executable, "-m", "kvproxy", "llama-server-args"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    log = tmp_path_factory.mktemp("matrix") / "llama-server.log"
    port = free_port()
    cmd = [
        str(llama_bin() / "llama-server"),
        *shlex.split(printed),
        "-ctk",
        "q4_0",
        "-ctv",
        "q4_0",
        "-fa",
        "on",
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "4096", "-np", "1", "--no-webui"]
    upstream = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        _healthy(f"http://127.0.0.1:{port}", upstream, log)
        proxy = start_server(
            "--primary", f"http://127.0.0.1:{port}", "--alias", "gemma", "--shadow-rate", "0", timeout=300
        )
        try:
            yield Target("proxy", proxy.v1, "gemma", f"http://127.0.0.1:{port}")
        finally:
            stop_server(proxy)
    finally:
        upstream.kill()
        upstream.wait(timeout=30)


def _healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama-server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(params=["embedded", "proxy"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "embedded":
        srv: RunningServer = request.getfixturevalue("server")
        return Target("embedded", srv.v1, srv.model)
    return request.getfixturevalue("proxy_target")  # type: ignore[no-any-return]


def check_call(name: str, arguments: str) -> dict[str, Any]:
    """A call of the tool whose arguments parse against its schema."""
    assert name == "weather"
    args = json.loads(arguments)
    jsonschema.validate(args, CITY_SCHEMA)
    return args  # type: ignore[no-any-return]


def check_first_turn(target: Target, calls: list[tuple[str, str]], text: str | None) -> None:
    if target.forced:
        assert len(calls) >= 1, text
    if calls:
        check_call(*calls[0])
    else:  # llama-server answered in text (it does not force required calls)
        assert text


# ---- openai-python: chat completions ---------------------------------------------------------


def test_openai_chat(target: Target) -> None:
    client = target.client()
    messages: list[Any] = [{"role": "user", "content": ASK}]
    base = {"model": target.model, "temperature": 0, "max_tokens": ROOM, "tools": [CHAT_TOOL]}
    first = client.chat.completions.create(messages=messages, tool_choice="required", **base)
    message = first.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    check_first_turn(target, calls, message.content)
    if calls:
        assert first.choices[0].finish_reason == "tool_calls"
    # streamed: the same call, as tool-call deltas
    stream = client.chat.completions.create(messages=messages, tool_choice="required", stream=True, **base)
    pieces: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for chunk in stream:
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names[d.index] = names.get(d.index) or (d.function.name if d.function and d.function.name else "")
            pieces.setdefault(d.index, []).append(d.function.arguments or "" if d.function else "")
    assert [(names[i], "".join(pieces[i])) for i in sorted(pieces)] == calls
    # the round trip: the call (the model's, or one given where llama-server made none) and its result
    call = message.tool_calls[0] if message.tool_calls else None
    assistant = message.model_dump(exclude_none=True) if call else _assistant_call()
    call_id = call.id if call else "call_given"
    history = [*messages, assistant, {"role": "tool", "tool_call_id": call_id, "content": RESULT}]
    answer = client.chat.completions.create(messages=history, **{**base, "max_tokens": 16})
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and answer.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]
    # structured output, parsed by the SDK
    parsed = client.chat.completions.parse(
        model=target.model,
        messages=[{"role": "user", "content": "Which city is the capital of France?"}],
        response_format=City,
        max_tokens=target.room,
        temperature=0,
    )
    assert isinstance(parsed.choices[0].message.parsed, City)


def _assistant_call() -> dict[str, Any]:
    fn = {"name": "weather", "arguments": '{"city":"Oslo"}'}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_given", "type": "function", "function": fn}],
    }


# ---- openai-python: Responses --------------------------------------------------------------------


def test_openai_responses(target: Target) -> None:
    client = target.client()
    base = {"model": target.model, "temperature": 0, "tools": [RESPONSES_TOOL]}
    first = client.responses.create(input=ASK, tool_choice="required", max_output_tokens=ROOM, **base)
    assert_valid("Response", first.model_dump(mode="json", exclude_unset=True))
    calls = [o for o in first.output if o.type == "function_call"]
    check_first_turn(target, [(c.name, c.arguments) for c in calls], first.output_text)
    assert first.max_output_tokens == ROOM and first.tool_choice == "required"
    ask = {"input": ASK, "tool_choice": "required", "max_output_tokens": ROOM, **base}
    if target.forced:  # the SDK's stream helper raises unless the response completes
        with client.responses.stream(**ask) as stream:  # type: ignore[arg-type]
            kinds = [event.type for event in stream]
            streamed = stream.get_final_response()
    else:
        events = list(client.responses.create(stream=True, **ask))  # type: ignore[call-overload]
        kinds = [event.type for event in events]
        streamed = events[-1].response
        assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [(o.type, getattr(o, "arguments", None)) for o in streamed.output] == [
        (o.type, getattr(o, "arguments", None)) for o in first.output
    ]
    if calls:
        assert "response.function_call_arguments.done" in kinds
    # the round trip: the call item and its output sent back (no max_output_tokens: the default cap)
    call = (
        calls[0].model_dump(exclude_none=True)
        if calls
        else {
            "type": "function_call",
            "call_id": "call_given",
            "name": "weather",
            "arguments": '{"city":"Oslo"}',
        }
    )
    back = [
        {"role": "user", "content": ASK},
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": RESULT},
    ]
    answer = client.responses.create(input=back, max_output_tokens=16, **base)
    assert answer.status in ("completed", "incomplete") and answer.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    parsed = client.responses.parse(
        model=target.model,
        input="Which city is the capital of France?",
        text_format=City,
        temperature=0,
        max_output_tokens=target.room,
    )
    assert isinstance(parsed.output_parsed, City) and parsed.status == "completed"


# ---- agent frameworks ------------------------------------------------------------------------------


def test_openai_agents(target: Target) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return RESULT

    model = OpenAIResponsesModel(target.model, target.async_client())
    settings = ModelSettings(temperature=0, max_tokens=target.room)
    caller = Agent(
        name="weather",
        tools=[weather],
        model=model,
        # required for the first turn; the runner resets it to auto after a call (reset_tool_choice)
        model_settings=settings.resolve(ModelSettings(tool_choice="required")),
        tool_use_behavior="stop_on_first_tool",
    )
    structured = Agent(name="geo", output_type=City, model=model, model_settings=settings)

    async def run() -> tuple[Any, Any]:
        done = await Runner.run(caller, ASK, max_turns=2)
        streamed = Runner.run_streamed(structured, "Which city is the capital of France?")
        async for _ in streamed.stream_events():
            pass
        return done, streamed.final_output

    if not target.forced:
        pytest.skip(
            "llama-server does not force tool_choice required (docs/clients.md); the base model answers text"
        )
    done, city = asyncio.run(run())
    assert seen and done.final_output == RESULT  # the tool ran on the model's call
    assert isinstance(city, City)


def test_pydantic_ai(target: Target) -> None:
    from pydantic_ai import Agent, ToolOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(target.model, provider=OpenAIProvider(openai_client=target.async_client()))
    # pydantic-ai's default structured output is a tool call (ToolOutput): tools are its protocol
    agent = Agent(
        model, output_type=ToolOutput(City), model_settings={"temperature": 0, "max_tokens": target.room}
    )
    if not target.forced:
        pytest.skip(
            "llama-server does not force tool_choice required (docs/clients.md); the base model answers text"
        )
    result = agent.run_sync("Which city is the capital of France?")
    assert isinstance(result.output, City)
    calls = [p for m in result.all_messages() for p in getattr(m, "parts", []) if p.part_kind == "tool-call"]
    assert calls and calls[0].tool_name == "final_result"


def test_langchain(target: Target) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=target.model,
        base_url=target.v1,
        api_key="unused",
        temperature=0,
        max_tokens=target.room,
        max_retries=0,
    )  # type: ignore[arg-type]
    bound = llm.bind_tools([CHAT_TOOL], tool_choice="required")
    first = bound.invoke([HumanMessage(ASK)])
    calls = [(c["name"], json.dumps(c["args"])) for c in first.tool_calls]  # type: ignore[attr-defined]
    check_first_turn(target, calls, str(first.content))
    if calls:
        answer = bound.bind(tool_choice="none").invoke(
            [HumanMessage(ASK), first, ToolMessage(RESULT, tool_call_id=first.tool_calls[0]["id"])]  # type: ignore[attr-defined]
        )
        assert answer.response_metadata["finish_reason"] in ("stop", "length")
    city = (
        llm.bind(max_tokens=target.room)
        .with_structured_output(City, method="json_schema")
        .invoke("Which city is the capital of France?")
    )
    assert isinstance(city, City)


def test_instructor(target: Target) -> None:
    import instructor

    ask = {
        "model": target.model,
        "messages": [{"role": "user", "content": "Which city is the capital of France?"}],
        "response_model": City,
        "temperature": 0,
        "max_tokens": target.room,
        "max_retries": 0,
    }
    json_client = instructor.from_openai(target.client(), mode=instructor.Mode.JSON_SCHEMA)
    assert isinstance(json_client.chat.completions.create(**ask), City)
    if not target.forced:
        pytest.skip("llama-server does not force a named tool_choice (docs/clients.md): TOOLS mode not run")
    # TOOLS mode (instructor's default for OpenAI): the answer is a forced call of the model's tool
    client = instructor.from_openai(target.client(), mode=instructor.Mode.TOOLS)
    assert isinstance(client.chat.completions.create(**ask), City)


# ---- JavaScript: openai-node -------------------------------------------------------------------------


def test_openai_node(target: Target) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JavaScript client (openai-node) is not tested")
    found = subprocess.run(
        [str(ROOT / "scripts" / "ensure-node-clients.sh")], capture_output=True, text=True, check=True
    )
    modules = found.stdout.strip()
    if not modules:
        pytest.skip(f"openai-node could not be installed: {found.stderr.strip()}")
    # an ES module finds its imports from where it lies: run a copy beside the installed client
    script = Path(modules) / "openai_node_agent.mjs"
    shutil.copyfile(ROOT / "tests" / "js" / "openai_node_agent.mjs", script)
    run = subprocess.run(
        ["node", str(script), target.v1, target.model, "1" if target.forced else "0", str(target.room)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=modules,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    calls = [(seen["call"]["name"], seen["call"]["arguments"])] if seen["call"] else []
    check_first_turn(target, calls, "text" if not calls else None)
    if calls:
        assert seen["finish"] == "tool_calls" and seen["answer"]["finish"] in ("stop", "length", "tool_calls")
    assert City.model_validate_json(seen["structured"])


# ---- the README's proxy quick start: the printed arguments give llama-server kvproxy's turns -----


def test_the_printed_llama_server_renders_kvproxys_gemma_turns(proxy_target: Target) -> None:
    """llama-server started with what ``kvproxy llama-server-args`` prints renders a chat exactly as
    the embedded backend's Gemma template does (before it, its ChatML fallback wrote <|im_start|>)."""
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "The sea?"},
    ]
    assert proxy_target.upstream is not None
    got = httpx.post(f"{proxy_target.upstream}/apply-template", json={"messages": chat}, timeout=60).json()
    ours = ChatTemplate.for_model("gemma3", None, "<bos>", "<eos>", add_bos=True).render(
        chat
    )  # BOS: the vocabulary adds it
    assert got["prompt"] == ours
    assert (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>" in ours
    )
