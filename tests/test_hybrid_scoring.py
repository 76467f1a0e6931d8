"""Shadow scoring on a hybrid model (qwen35moe: a recurrent layer and an attention layer).

A recurrent state cannot be rolled back one token: whatever scores a job must start it from zero,
never from a previous job's or a longer prefix's state.

* Embedded: generation resets the whole memory per request (llama-cpp-python's ``Llama.reset`` calls
  ``llama_memory_clear`` on recurrent and hybrid models), and the scorer clears both of its contexts
  per job (``llama_memory_clear(mem, true)``, which zeroes the recurrent buffers). The decode-path
  replay must then equal what generation served bit for bit, whatever was scored before.
* llama-server per-position scoring (``LlamaServerReference``): every answer must equal a fresh
  prefill of its prefix, and pinning the job to one slot must keep the prompt from being processed
  again at every position.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import httpx
import numpy as np

from kvproxy.backends.base import (
    Finished,
    GenerationRequest,
    KVConfig,
    SamplingParams,
    TokenLogprob,
)
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.config import KVCacheType as T
from kvproxy.config import Settings
from kvproxy.model.gguf_info import read_model_info
from kvproxy.scoring.embedded import make_scorer
from kvproxy.scoring.job import PrimaryReport
from kvproxy.scoring.llama_server import LlamaServerReference
from kvproxy.serving.openai_format import collect
from kvproxy.upstream.replicas import ReplicaPool, Timeouts
from tests.arch_models import tiny_model
from tests.llama_servers import start_llama_server
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

F16 = KVConfig(T.F16, T.F16)


async def _generate(
    backend: EmbeddedBackend, prompt: list[int], n: int
) -> tuple[list[TokenLogprob], Finished]:
    request = GenerationRequest(
        prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0), top_logprobs=5
    )
    got = await collect(backend.generate(request))
    return got.logprobs, got.done


def test_embedded_generation_and_scoring_start_every_job_from_a_zero_state() -> None:
    path = tiny_model("qwen35moe")
    settings = Settings(
        model=path, ctx_size=256, threads=THREADS_N, shadow_rate=0, cache_type_k=T.Q4_0, cache_type_v=T.Q4_0
    )
    backend = EmbeddedBackend(settings, read_model_info(path))
    rng = random.Random(1)
    prompt_a = [rng.randrange(128) for _ in range(60)]
    prompt_b = [rng.randrange(128) for _ in range(90)]

    async def run() -> list[tuple[list[TokenLogprob], Finished]]:
        await backend.load()
        return [await _generate(backend, p, 24) for p in (prompt_a, prompt_b, prompt_a)]

    (served_a, done_a), (_, done_b), (again_a, done_a2) = asyncio.run(run())
    # generation: the same request after another one gives the same tokens and the same numbers
    assert done_a.token_ids == done_a2.token_ids
    assert [s.logprob for s in served_a] == [s.logprob for s in again_a]

    check = [[s.token_id, *(t.token_id for t in s.top)] for s in served_a]
    want = np.array([[s.logprob, *(t.logprob for t in s.top)] for s in served_a])
    scorer = make_scorer(backend, F16, path="decode")
    try:
        fresh = scorer.score(prompt_a, list(done_a.token_ids), check)
        scorer.score(prompt_b, list(done_b.token_ids))  # another job's state in both contexts...
        after = scorer.score(prompt_a, list(done_a.token_ids), check)  # ...must not leak into this one
    finally:
        scorer.close()
        backend.close()
    assert fresh.check_logprobs is not None and after.check_logprobs is not None
    # the decode replay of the primary's config is what generation served, bit for bit
    assert np.array_equal(np.array(fresh.check_logprobs), want)
    assert np.array_equal(np.array(after.check_logprobs), want)
    assert np.array_equal(fresh.kld, after.kld) and np.array_equal(fresh.p_ref, after.p_ref)
    assert np.isfinite(fresh.kld).all() and (fresh.kld >= 0).all()


def _prompt_tokens_processed(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^llamacpp:prompt_tokens_total (\S+)$", text, re.M)
    assert m, text[:500]
    return float(m.group(1))


def _fresh_tops(url: str, prefix: list[int], k: int) -> tuple[list[int], list[float]]:
    body = {"prompt": prefix, "n_predict": 1, "n_probs": k, "cache_prompt": False, "temperature": 0.0}
    probs = httpx.post(f"{url}/completion", json=body, timeout=60).json()["completion_probabilities"][0]
    return [int(p["id"]) for p in probs["top_logprobs"]], [float(p["logprob"]) for p in probs["top_logprobs"]]


def test_per_position_llama_server_scoring_on_hybrid(tmp_path: Path) -> None:
    """llama-server's default 4 slots: an f16 job scored against itself reads 0, every position's
    top-K equals a fresh prefill of that prefix, and the prompt is processed once, not per position."""
    path = tiny_model("qwen35moe")
    srv = start_llama_server(path, tmp_path, "-c", "1024", "--metrics")
    try:
        rng = random.Random(2)
        prompt = [rng.randrange(128) for _ in range(120)]
        k, n = 10, 48
        # the "primary" is the same f16 server answering each prefix from scratch
        tokens: list[int] = []
        tops = []
        for _ in range(n):
            ids, lps = _fresh_tops(srv.url, prompt + tokens, k)
            tops.append((ids, lps))
            tokens.append(ids[0])
        report = PrimaryReport(
            token_ids=tokens,
            token_logprobs=[lps[0] for _, lps in tops],
            top_ids=[ids for ids, _ in tops],
            top_logprobs=[lps for _, lps in tops],
        )
        before = _prompt_tokens_processed(srv.url)

        async def score() -> tuple[np.ndarray, np.ndarray]:
            pool = ReplicaPool([srv.url], Timeouts(5, 60, 120))
            try:
                ref = LlamaServerReference(pool, top_k=k, batch=16)
                s = await ref.score(prompt, report)
                return s.kld, s.p_ref
            finally:
                await pool.close()

        kld, p_ref = asyncio.run(score())
        processed = _prompt_tokens_processed(srv.url) - before
    finally:
        srv.kill()
    assert np.abs(kld).max() < 1e-4  # f16 against itself: the same distribution at every position
    assert np.allclose(p_ref, np.exp(report.token_logprobs), atol=1e-4)
    # pinned to one slot: the prompt once, then about one token a position (unpinned: ~50 a position)
    assert processed <= len(prompt) + 2 * n, processed
