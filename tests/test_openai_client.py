"""The official ``openai`` client against a real ``kvproxy serve`` on the bundled Gemma 3 270M.

The bundled GGUF is the base (pretrained) model, so nothing here asserts answer quality; it asserts
the protocol: determinism at temperature 0, streaming equal to non-streaming, usage, stops, limits
and the shape of logprobs.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import llama_cpp
import openai
import pytest

from tests.conftest import RunningServer

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vocab(gemma_path: Path) -> llama_cpp.Llama:
    """An independent tokenizer: the same GGUF loaded vocabulary-only by llama-cpp-python."""
    return llama_cpp.Llama(str(gemma_path), vocab_only=True, verbose=False)


def test_models_lists_the_gguf_name(client: openai.OpenAI, server: RunningServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["Gemma 3 270m"] == [server.model]


def test_temperature_zero_is_deterministic(client: openai.OpenAI, server: RunningServer) -> None:
    outs = [
        client.chat.completions.create(model=server.model, messages=PROMPT, temperature=0, max_tokens=24)
        for _ in range(3)
    ]
    texts = {o.choices[0].message.content for o in outs}
    assert len(texts) == 1
    assert outs[0].choices[0].message.content
    assert outs[0].object == "chat.completion"
    assert outs[0].choices[0].message.role == "assistant"


def test_same_seed_same_sample(client: openai.OpenAI, server: RunningServer) -> None:
    def sample(seed: int) -> str | None:
        out = client.chat.completions.create(
            model=server.model, messages=PROMPT, temperature=1.0, seed=seed, max_tokens=24
        )
        return out.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1  # sampling really samples


def test_stream_concatenates_to_non_stream(client: openai.OpenAI, server: RunningServer) -> None:
    whole = client.chat.completions.create(model=server.model, messages=PROMPT, temperature=0, max_tokens=32)
    stream = client.chat.completions.create(
        model=server.model,
        messages=PROMPT,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]


def test_usage_matches_the_tokenizer(
    client: openai.OpenAI, server: RunningServer, vocab: llama_cpp.Llama
) -> None:
    out = client.chat.completions.create(
        model=server.model, messages=PROMPT, temperature=0, max_tokens=10, logprobs=True
    )
    # Gemma's own turn format (the GGUF carries no template), tokenized independently.
    prompt = (
        "<bos><start_of_turn>user\nWrite one sentence about the sea.<end_of_turn>\n<start_of_turn>model\n"
    )
    expected_prompt_tokens = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    assert out.usage is not None
    assert out.usage.prompt_tokens == expected_prompt_tokens
    assert out.usage.completion_tokens == 10 == len(out.choices[0].logprobs.content)  # type: ignore[union-attr, arg-type]
    assert out.usage.total_tokens == expected_prompt_tokens + 10
    # The generated tokens' bytes are exactly the completion text.
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert bytes(b for t in content for b in t.bytes).decode() == out.choices[0].message.content  # type: ignore[union-attr]


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI, server: RunningServer) -> None:
    for kwargs in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        out = client.chat.completions.create(model=server.model, messages=PROMPT, temperature=0, **kwargs)  # type: ignore[call-overload]
        assert out.usage.completion_tokens == 5
        assert out.choices[0].finish_reason == "length"


def test_stop_sequence_stops(client: openai.OpenAI, server: RunningServer) -> None:
    free = client.chat.completions.create(model=server.model, messages=PROMPT, temperature=0, max_tokens=40)
    text = free.choices[0].message.content or ""
    assert len(text) > 12
    stop = text[8:11]  # a piece from the middle of what the model says anyway
    cut = client.chat.completions.create(
        model=server.model, messages=PROMPT, temperature=0, max_tokens=40, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    streamed = client.chat.completions.create(
        model=server.model, messages=PROMPT, temperature=0, max_tokens=40, stop=stop, stream=True
    )
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_have_the_requested_shape(client: openai.OpenAI, server: RunningServer) -> None:
    out = client.chat.completions.create(
        model=server.model, messages=PROMPT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 8
    for entry in content:
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert all(lp <= 0 for lp in tops)
        assert sum(math.exp(lp) for lp in tops) <= 1 + 1e-5
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    none = client.chat.completions.create(model=server.model, messages=PROMPT, temperature=0, max_tokens=3)
    assert none.choices[0].logprobs is None


def test_streamed_logprobs_match(client: openai.OpenAI, server: RunningServer) -> None:
    kwargs = {
        "model": server.model,
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]  # type: ignore[call-overload]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx(
        [e.logprob for e in whole.choices[0].logprobs.content]
    )


def test_completions_route(client: openai.OpenAI, server: RunningServer) -> None:
    out = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert out.usage is not None and out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 8
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 8
    assert "".join(choice.logprobs.tokens or []) == choice.text
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs or [])
    streamed = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_completions_take_token_ids(
    client: openai.OpenAI, server: RunningServer, vocab: llama_cpp.Llama
) -> None:
    ids = vocab.tokenize(b"The capital of France is", add_bos=True, special=True)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_async_client_two_concurrent_streams(server: RunningServer) -> None:
    prompts = [
        [{"role": "user", "content": "Name three colours."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}],
    ]

    async def run() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)

        async def streamed(messages: list[dict[str, str]]) -> str:
            stream = await aclient.chat.completions.create(
                model=server.model,
                messages=messages,
                temperature=0,
                max_tokens=24,
                stream=True,  # type: ignore[arg-type]
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def whole(messages: list[dict[str, str]]) -> str | None:
            out = await aclient.chat.completions.create(
                model=server.model,
                messages=messages,
                temperature=0,
                max_tokens=24,  # type: ignore[arg-type]
            )
            return out.choices[0].message.content

        together = await asyncio.gather(*(streamed(m) for m in prompts))
        alone = [await whole(m) for m in prompts]
        assert list(together) == alone
        assert together[0] != together[1]
        await aclient.close()

    asyncio.run(run())
