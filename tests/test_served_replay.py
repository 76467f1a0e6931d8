"""The decode-path replay reproduces what a single-stream llama-server served, once it cuts the
prompt the way llama-server did (kvproxy.scoring.prompt_fill): a real llama-server (f16 KV, one
slot, its default context checkpoints) generates greedily with its top-20 logprobs, and kvproxy's
scorer replays the same token ids on the same weights. With llama-server's cuts the rows agree to
float32 rounding (llama-server normalises with a float32 sum, a constant shift per row); in one call,
as a replay did before, they differ by about what the prefill and decode paths differ by."""

from __future__ import annotations

from pathlib import Path

import httpx
import llama_cpp
import numpy as np
import pytest

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType as T
from kvproxy.config import ScorePath
from kvproxy.corpus import english_text
from kvproxy.scoring.embedded import EmbeddedScorer
from kvproxy.scoring.prompt_fill import PromptFill
from tests.llama_servers import llama_servers
from tests.workers import llama_threads

THREADS_N = llama_threads()  # tests/workers.py: one on a pinned worker

F16 = KVConfig(T.F16, T.F16)


def served(url: str, text: str, n: int) -> tuple[list[int], list[int], list[list[int]], np.ndarray]:
    """Prompt ids, generated ids, and per position the served top-20 ids and logprobs."""
    prompt = httpx.post(f"{url}/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    r = httpx.post(
        f"{url}/completion",
        json={"prompt": prompt, "n_predict": n, "temperature": 0, "n_probs": 20, "cache_prompt": False},
        timeout=120,
    ).json()
    probs = r["completion_probabilities"]
    ids = [[t["id"] for t in p["top_logprobs"]] for p in probs]
    return (
        prompt,
        [p["id"] for p in probs],
        ids,
        np.array([[t["logprob"] for t in p["top_logprobs"]] for p in probs]),
    )


@pytest.mark.slow
def test_the_replay_with_llama_servers_cuts_is_the_served_rows(gemma_path: Path, tmp_path: Path) -> None:
    text = " ".join(english_text().split()[:70])
    with llama_servers(gemma_path, tmp_path, ("-np", "1", "-fa", "on", "-t", str(THREADS_N))) as (server,):
        prompt, tokens, top_ids, want = served(server.url, text, 16)
    assert PromptFill().calls(len(prompt), cuts_apply=True)[-1] == (len(prompt) - 4, len(prompt))
    llm = llama_cpp.Llama(str(gemma_path), n_ctx=64, verbose=False)
    scorer = EmbeddedScorer(
        llm._model,
        primary=F16,
        reference=F16,
        n_ctx=2048,
        threads=THREADS_N,
        flash_attn=True,
        path=ScorePath.DECODE,
    )
    assert scorer.cuts_apply  # Gemma 3 has sliding-window layers
    try:
        got = {
            fill: np.array(scorer.score(prompt, tokens, top_ids, fill).check_logprobs)
            for fill in (PromptFill(), None)
        }
    finally:
        scorer.close()
        llm.close()

    def gap(rows: np.ndarray) -> float:
        """The largest difference once each row's constant offset (the float32 normaliser) is gone."""
        d = rows - want
        return float(np.abs(d - d.mean(axis=1, keepdims=True)).max())

    mirrored, one_call = gap(got[PromptFill()]), gap(got[None])
    print(
        f"\nserved vs replay, max |Δ logprob| after each row's offset: llama-server's cuts {mirrored:.2e}, "
        f"one call {one_call:.2e}; largest offset {np.abs(got[PromptFill()] - want).max():.2e}"
    )
    assert mirrored < 1e-5
    assert np.abs(got[PromptFill()] - want).max() < 1e-3  # the offsets themselves are small
    assert one_call > 1e-2  # why the cuts matter
