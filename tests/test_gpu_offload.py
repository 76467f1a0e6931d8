"""On a GPU: the embedded model and its scorer offload every layer by default, say so, and the decode
replay still reproduces what was served. Skipped where llama-cpp-python cannot offload (a CPU build,
as in CI); the GPU figures come from benchmarks/gpu/ on the H200 (docs/kld.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvproxy.backends.base import GenerationRequest, KVConfig, SamplingParams
from kvproxy.backends.devices import gpu_devices, gpu_offload_supported, resolve_gpu_layers
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import KVCacheType as T
from kvproxy.config import Settings
from kvproxy.model.gguf_info import read_model_info
from kvproxy.scoring.embedded import make_scorer

pytestmark = pytest.mark.skipif(
    not (gpu_offload_supported() and gpu_devices()),
    reason="no GPU here, or a CPU build of llama-cpp-python (make install CUDA=1 builds one that offloads)",
)


def test_default_offload_and_served_equals_replayed_on_the_gpu(gemma_path: Path) -> None:
    assert resolve_gpu_layers(None) == -1  # all layers by default where a GPU can take them
    backend = EmbeddedBackend(Settings(model=gemma_path, ctx_size=1024), read_model_info(gemma_path))
    assert backend.offload.label.startswith("CUDA") and "all" in str(backend.offload)

    async def run() -> tuple[list[int], list[float], tuple[int, ...]]:
        await backend.load()
        prompt = backend.tokenize("The history of the Roman Empire is", add_bos=True)
        request = GenerationRequest(prompt, 24, SamplingParams(temperature=0), top_logprobs=0)
        served: list[float] = []
        tokens: tuple[int, ...] = ()
        async for event in backend.generate(request):
            served += [lp.logprob for lp in getattr(event, "logprobs", ())]
            tokens = getattr(event, "token_ids", tokens)
        return prompt, served, tokens

    prompt, served, tokens = asyncio.run(run())
    scorer = make_scorer(backend, KVConfig(T.F16, T.F16))
    try:
        scores = scorer.score(prompt, list(tokens), [[t] for t in tokens])
    finally:
        scorer.close()
        backend.close()
    replayed = [row[0] for row in scores.check_logprobs or []][: len(served)]
    assert replayed == served  # bit for bit, on the GPU too
