"""The slot scheduler in process: its KV cache is what the figures say, and prompts fill in chunks.

The server-level behaviour (queue, deadlines, fairness, cancellation) is in test_embedded_load.py.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvproxy.backends.base import Finished, GenerationRequest, SamplingParams, TextDelta
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import KVCacheType as T
from kvproxy.config import Settings
from kvproxy.corpus import english_text
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import kv_memory_summary

SLOTS_CHILD = r"""
import sys
import llama_cpp
from llama_cpp import _internals
from kvproxy.backends.slots import SlotConfig, SlotScheduler
path = sys.argv[1]
n_ctx, slots, type_k, type_v = (int(a) for a in sys.argv[2:6])
model = _internals.LlamaModel(path_model=path, params=llama_cpp.llama_model_default_params(), verbose=True)
config = SlotConfig(n_slots=slots, n_ctx=n_ctx, n_batch=512, n_ubatch=512, prefill_chunk=128, threads=1,
                    flash_attn=True, type_k=type_k, type_v=type_v, max_queue=0)
scheduler = SlotScheduler(model, config, int(model.n_vocab()))
scheduler.start()
print("n_ctx_seq", scheduler.n_ctx_seq, flush=True)
scheduler.close()
"""


@pytest.mark.parametrize("slots", [1, 3])
@pytest.mark.parametrize("types", [(T.Q4_0, T.Q4_0), (T.F16, T.F16)])
def test_the_slots_kv_cache_is_what_the_banner_and_metrics_say(
    gemma_path: Path, slots: int, types: tuple[T, T]
) -> None:
    """One KV stream of ``--ctx-size`` cells per slot (sliding-window cache included), as
    ``kv_memory_summary(n_seq=slots)`` counts it; checked against llama.cpp's own log."""
    from kvproxy.model.memory import ggml_type

    n_ctx = 1000  # not a multiple of 256: llama.cpp pads each stream
    args = [str(gemma_path), str(n_ctx), str(slots), *(str(int(ggml_type(t))) for t in types)]
    out = subprocess.run(
        [sys.executable, "-c", SLOTS_CHILD, *args], capture_output=True, text=True, timeout=300, check=True
    )
    logs = out.stderr + out.stdout
    sizes = re.findall(r"llama_kv_cache: size =\s+([0-9.]+) MiB", logs)
    assert sizes, logs[-2000:]
    reported = sum(float(s) for s in sizes) * 2**20
    info = read_model_info(gemma_path)
    figures = kv_memory_summary(info.attention, *types, n_ctx * slots, n_ubatch=512, n_seq=slots)
    assert figures["allocated_bytes"] == pytest.approx(reported, rel=0.01)
    assert "n_ctx_seq 1024" in logs


def test_a_long_prompt_fills_in_chunks_between_the_tokens_of_a_running_stream(gemma_path: Path) -> None:
    """With two slots, a 600-token prompt arriving while another sequence generates joins each
    batch 64 tokens at a time: the running stream gets a token from every one of those batches,
    instead of waiting for the whole fill."""
    settings = Settings(
        model=gemma_path, ctx_size=1024, threads=2, shadow_rate=0, parallel=2, prefill_chunk=64
    )
    backend = EmbeddedBackend(settings, read_model_info(gemma_path))
    order: list[str] = []

    async def consume(name: str, request: GenerationRequest, started: asyncio.Event | None = None) -> None:
        async for event in backend.generate(request):
            if isinstance(event, TextDelta) and event.text:
                order.append(name)
                if started is not None and order.count(name) >= 2:
                    started.set()
            if isinstance(event, Finished):
                order.append(f"{name}:end")
                return

    async def run() -> int:
        await backend.load()
        counting = backend.tokenize("1, 2, 3, 4, 5,", add_bos=True)
        long_prompt = backend.tokenize(" ".join(english_text().split()[:450]), add_bos=True)
        greedy = SamplingParams(temperature=0.0)
        started = asyncio.Event()
        a = asyncio.create_task(consume("A", GenerationRequest(counting, 60, greedy), started))
        await started.wait()
        b = asyncio.create_task(consume("B", GenerationRequest(long_prompt, 1, greedy)))
        await b
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        return len(long_prompt)

    try:
        n_prompt = asyncio.run(run())
    finally:
        backend.close()
    before_b = order[: order.index("B")]
    a_during_fill = before_b.count("A") - 2
    chunks = -(-n_prompt // 64)
    print(f"\n{n_prompt}-token prompt, {chunks} chunks of 64: {a_during_fill} tokens of A during the fill")
    assert n_prompt > 500
    assert a_during_fill >= chunks - 3  # one token of A per chunk (the count at the edges may slip)


def test_a_grammar_llama_cpp_refuses_fails_the_request_at_once(gemma_path: Path) -> None:
    """The serving layer checks grammars before queueing; should one still fail when its slot's
    sampler is made, the request gets the error at once (not at its queue deadline) and the slot
    serves the next request."""
    from kvproxy.backends.base import BackendError

    settings = Settings(model=gemma_path, ctx_size=512, threads=2, shadow_rate=0, queue_timeout=30)
    backend = EmbeddedBackend(settings, read_model_info(gemma_path))

    async def run() -> tuple[float, Finished]:
        await backend.load()
        prompt = backend.tokenize("Hello", add_bos=True)
        start = asyncio.get_running_loop().time()
        with pytest.raises(BackendError, match="grammar"):
            async for _ in backend.generate(GenerationRequest(prompt, 2, grammar="root ::= (")):
                pass
        took = asyncio.get_running_loop().time() - start
        async for event in backend.generate(GenerationRequest(prompt, 2, SamplingParams(temperature=0.0))):
            if isinstance(event, Finished):
                return took, event
        raise AssertionError("no Finished")

    try:
        took, done = asyncio.run(run())
    finally:
        backend.close()
    assert took < 5
    assert done.completion_tokens >= 1
