"""Popular OpenAI clients, unchanged and on their defaults, against a real ``kvproxy serve`` on the
bundled Gemma 3 270M: one test per client (issue 19).

The server sets ``--max-tokens-default 16`` (the clients send no limit, and the base model rarely
stops by itself) and shadows nothing (shadow scoring of these routes is tested in
tests/test_compat_model.py). The bundled model is the base model, which cannot follow a schema given
only in its prompt, so the structured outputs here are the grammar-enforced ones (``json_schema``),
and ``json_object`` (pydantic-ai's ``PromptedOutput``) is checked for what it promises: a JSON object.
Where a client's own test needs a response that ends by itself (openai-agents treats a response cut
by its limit as a failure), the JSON schema's grammar ends it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import RunningServer, start_server, stop_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch of its price list


class City(BaseModel):
    city: str = Field(max_length=24)


# room for a whole City object (the server's default of 16 tokens can cut a long name's closing
# brace: a cut object is the limit working, not a grammar failure)
ROOM = 64


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    s = start_server("--ctx-size", "1024", "--max-tokens-default", "16", "--shadow-rate", "0")
    yield s
    stop_server(s)


@pytest.fixture()
def env(srv: RunningServer, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """What pydantic-ai's ``"openai:..."`` reads: the base URL and a key."""
    monkeypatch.setenv("OPENAI_BASE_URL", srv.v1)
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    return srv


CITY_FORMAT = {
    "type": "json_schema",
    "name": "city",
    "strict": True,
    "schema": City.model_json_schema() | {"additionalProperties": False},
}


def test_openai_python(srv: RunningServer) -> None:
    client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=300)
    assert client.models.retrieve(srv.model).id == srv.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")

    # the Responses API, streamed: every event type in order, ending in response.completed with usage
    stream = client.responses.create(
        model=srv.model,
        input="The capital of France is",
        stream=True,
        text={"format": CITY_FORMAT},
        max_output_tokens=ROOM,
        temperature=0,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[:4] == [*head, "response.content_part.added"], kinds
    tail = ["response.content_part.done", "response.output_item.done", "response.completed"]
    assert kinds[-4:] == ["response.output_text.done", *tail], kinds
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.status == "completed" and done.usage is not None and done.usage.output_tokens > 0
    assert City.model_validate_json(done.output_text)

    # not streamed; logprobs where asked for
    out = client.responses.create(
        model=srv.model,
        input=[{"role": "user", "content": "Hi"}],
        instructions="Answer briefly.",
        max_output_tokens=4,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
        store=False,
    )
    assert out.status == "incomplete" and out.usage is not None and out.usage.output_tokens == 4
    assert len(out.output[0].content[0].logprobs) == 4  # type: ignore[union-attr]

    # chat with a JSON schema, parsed by the SDK into the model
    parsed = client.chat.completions.parse(
        model=srv.model,
        messages=[{"role": "user", "content": "The capital of France?"}],
        response_format=City,
        max_tokens=ROOM,
        temperature=0,
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    assert parsed.choices[0].message.refusal is None

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=srv.model, input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError, match="generation only"):
        client.embeddings.create(model=srv.model, input="Hi")


def test_pydantic_ai(env: RunningServer) -> None:
    from pydantic_ai import Agent, NativeOutput, PromptedOutput
    from pydantic_ai.exceptions import OutputTokenLimitExceeded
    from pydantic_ai.models.openai import OpenAIResponsesModel

    agent = Agent(f"openai:{env.model}")
    assert isinstance(agent.model, OpenAIResponsesModel)  # its default: the Responses API
    result = agent.run_sync("The sea is")
    assert isinstance(result.output, str) and result.output

    async def streamed() -> str:
        async with agent.run_stream("The sea is") as run:
            return "".join([part async for part in run.stream_text(delta=True)])

    assert asyncio.run(streamed())

    # PromptedOutput asks for json_object: a JSON object comes back (the base model cannot follow a
    # schema written in its prompt, so the output type takes any object)
    class AnyObject(BaseModel):
        model_config = ConfigDict(extra="allow")

    prompted = Agent(
        f"openai:{env.model}",
        output_type=PromptedOutput(AnyObject),
        model_settings={"max_tokens": 64, "temperature": 0},
    )
    # Greedy, the 270M model opens an object and keeps adding keys past any limit (json_object has no
    # schema to close it; sampled, it sometimes closed it): what this shows is that the request went
    # out as json_object and the text was held to JSON up to the cut, which pydantic-ai reports as
    # its token-limit error with the cut object as the cause
    with pytest.raises(OutputTokenLimitExceeded) as cut:
        prompted.run_sync("Describe Paris.")
    cause = str(cut.value.__cause__)
    assert "json_invalid" in cause and "EOF while parsing" in cause and "input_value='{" in cause, cause
    # NativeOutput sends the schema itself (json_schema): the grammar holds the output to it
    native = Agent(
        f"openai:{env.model}",
        output_type=NativeOutput(City),
        model_settings={"max_tokens": 48, "temperature": 0},
    )
    assert isinstance(native.run_sync("Which city is the capital of France?").output, City)


def test_openai_agents(srv: RunningServer) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # no trace export to OpenAI
    client = openai.AsyncOpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
    agent = Agent(
        name="geo",
        instructions="Answer briefly.",
        output_type=City,
        model=OpenAIResponsesModel(srv.model, client),
        model_settings=ModelSettings(max_tokens=64),  # room for the whole object: a cut one fails the run
    )

    async def run() -> tuple[Any, Any, list[str]]:
        done = await Runner.run(agent, "Which city is the capital of France?")
        streamed = Runner.run_streamed(agent, "Which city is the capital of France?")
        kinds = [event.type async for event in streamed.stream_events()]
        return done.final_output, streamed.final_output, kinds

    final, streamed_final, kinds = asyncio.run(run())
    assert isinstance(final, City) and isinstance(streamed_final, City)
    assert "raw_response_event" in kinds


def test_langchain(srv: RunningServer) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    llm = ChatOpenAI(
        model=srv.model, base_url=srv.v1, api_key="unused", use_responses_api=True, max_retries=0
    )
    message = llm.invoke("The sea is")
    assert message.text and message.usage_metadata
    assert 0 < message.usage_metadata["output_tokens"] <= 16  # it sent no limit: the server's default
    assert "  max tokens 16 tokens for requests that set no limit (--max-tokens-default)\n" in srv.output
    assert "".join(chunk.text for chunk in llm.stream("The sea is"))
    embeddings = OpenAIEmbeddings(
        model=srv.model, base_url=srv.v1, api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    with pytest.raises(openai.NotFoundError, match="generation only"):
        embeddings.embed_query("Hi")


def test_litellm(srv: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # on import litellm fetches its model price map from GitHub, retrying for about 7 s where it
    # cannot (CI has no internet); its bundled copy is the documented offline setting, and prices
    # play no part in what is served
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    model, base = f"openai/{srv.model}", {"api_base": srv.v1, "api_key": "unused"}
    chat = litellm.completion(model=model, messages=[{"role": "user", "content": "Hi"}], **base)
    assert chat.choices[0].message.content
    response = litellm.responses(model=model, input="The sea is", **base)
    assert response.output and response.usage.output_tokens > 0
    structured = litellm.completion(
        model=model,
        messages=[{"role": "user", "content": "The capital of France?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY_FORMAT["schema"]},
        },
        max_tokens=ROOM,
        temperature=0,
        **base,
    )
    assert City.model_validate(json.loads(structured.choices[0].message.content))
    with pytest.raises(litellm.NotFoundError, match="generation only"):
        litellm.embedding(model=model, input=["Hi"], **base)
