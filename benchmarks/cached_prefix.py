"""Why a second chat turn on a cached prefix reads high served-vs-replay, and whether a replay can
model it (issue 27, the limit docs/production.md names).

    .venv/bin/python benchmarks/cached_prefix.py [--kv q4_0] [--threads 2] [--tokens 16]

One llama-server on its defaults (Jinja on, ChatML for the bundled Gemma 3 270M), ``-np 1 -fa on``,
the KV config ``--kv``: turn 1 (system, user), then turn 2 (turn 1, its answer, a second user
message) with ``cache_prompt`` on and the top-20 logprobs. llama-server reports how many prompt
tokens it took from the slot (``timings.cache_n``). Then llama-cpp-python, in process, same model,
KV config, threads, context and micro-batch, recomputes turn 2's rows three ways and compares each
with the served top-20 (mean coarse KL a token, as ``replica_consistency``):

* ``scratch``: turn 2's prompt from nothing, with llama-server's cuts for an empty slot
  (``PromptFill.calls``): what kvproxy's replay does;
* ``cached``: the first ``cache_n`` tokens in the calls turn 1's prompt was cut into (its own
  ``PromptFill.calls``), then the rest of turn 2 from ``cache_n`` with the cuts llama-server makes
  there (the last user start, 4 + n_ubatch and 4 tokens before the end; an earlier user start only
  without a checkpoint, and turn 1 left some): what the proxy now replays
  (``kvproxy.scoring.cached_prefix.replay_calls``);
* ``cached, no restore``: the same, but the prefix as long as the common prefix of the two prompts
  (what a slot without SWA checkpoints would reuse), to show which boundary matters.

Found on a Gemma 3 (sliding-window) model: llama-server restores the newest context checkpoint whose
``pos_max`` is at or before the common prefix (server-context.cpp: with a prompt shorter than the
window ``pos_min`` is 0, so the checkpoint search always runs), so ``cache_n`` is where turn 1's
last checkpoint was taken (4 tokens before turn 1's end, less one), not the common prefix.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from benchmarks.served_rows import Calls, Replay, exact_logprobs
from kvproxy.backends.embedded import bundled_model_path
from kvproxy.kld import coarse_kld_row
from kvproxy.scoring.cached_prefix import Prompt, replay_calls
from kvproxy.scoring.prompt_fill import PromptFill, restored_prefix
from tests.llama_servers import start_llama_server
from tests.test_served_replay_jinja import chat, words

GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
TURN1 = chat("Explain the text below to a new developer.", words(2000, 60))
FOLLOW_UP = "Now say the same in fewer words, then list two risks: " + words(2100, 20)


def tokens_of(url: str, messages: list[dict[str, str]]) -> list[int]:
    prompt = httpx.post(f"{url}/apply-template", json={"messages": messages}, timeout=60).json()["prompt"]
    body = {"content": prompt, "add_special": True, "parse_special": True}
    return [int(t) for t in httpx.post(f"{url}/tokenize", json=body, timeout=60).json()["tokens"]]


def user_starts(url: str, tokens: list[int]) -> list[int]:
    """Where ChatML's ``<|im_start|>user`` starts (the bundled Gemma's fallback template)."""
    body = {"content": "<|im_start|>user", "add_special": False, "parse_special": True}
    marker = httpx.post(f"{url}/tokenize", json=body, timeout=60).json()["tokens"]
    m = len(marker)
    return [i for i in range(len(tokens) - m + 1) if tokens[i : i + m] == marker]


def served_rows(data: dict[str, Any]) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
    toks, rows = [], []
    for p in data["choices"][0]["logprobs"]["content"]:
        toks.append(int(p["id"]))
        rows.append(
            ([int(t["id"]) for t in p["top_logprobs"]], [float(t["logprob"]) for t in p["top_logprobs"]])
        )
    return toks, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="q4_0", choices=sorted(GGML_TYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--server-args", default="-np 1", help="more llama-server flags, e.g. '-np 4 -c 8192'")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="llama-server's -ngl and the replay's")
    ap.add_argument("--warm", type=int, default=0, help="unrelated chats sent first (other slots in use)")
    args = ap.parse_args()
    model_path = bundled_model_path()
    logs = Path(tempfile.mkdtemp(prefix="cached-prefix-"))
    t, kv = str(args.threads), args.kv
    srv = start_llama_server(
        model_path,
        logs,
        "-fa",
        "on",
        "-t",
        t,
        "-ctk",
        kv,
        "-ctv",
        kv,
        "-ngl",
        str(args.n_gpu_layers),
        *args.server_args.split(),
        jinja=True,
    )
    common = {"temperature": 0, "max_tokens": args.tokens}
    try:
        for i in range(args.warm):
            warm = chat(f"Chat {i}: read this.", words(3000 + 300 * i, 150 + 40 * i))
            httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": warm, **common}, timeout=600)
        one = httpx.post(
            f"{srv.url}/v1/chat/completions", json={"messages": TURN1, **common}, timeout=600
        ).json()
        answer = one["choices"][0]["message"]["content"]
        turn2 = [*TURN1, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
        two = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"messages": turn2, "logprobs": True, "top_logprobs": 20, **common},
            timeout=600,
        ).json()
        p1, p2 = tokens_of(srv.url, TURN1), tokens_of(srv.url, turn2)
        u1, u2 = user_starts(srv.url, p1), user_starts(srv.url, p2)
    finally:
        srv.kill()
    cache_n = int(two["timings"]["cache_n"])
    n1, n2 = len(p1), len(p2)
    assert n2 == two["usage"]["prompt_tokens"], (n2, two["usage"])
    lcp = next((i for i, (a, b) in enumerate(zip(p1, p2, strict=False)) if a != b), min(n1, n2))
    toks, rows = served_rows(two)
    fill1, fill2 = PromptFill().for_prompt(u1), PromptFill().for_prompt(u2)
    filled1 = fill1.fill(n1, cuts_apply=True)
    print(f"llama-server {args.server_args} -ngl {args.n_gpu_layers}, {args.warm} chats before")
    print(
        f"KV {kv}, -t {t}: turn 1 {n1} prompt tokens, user starts {u1}, calls {list(filled1.calls)}, "
        f"checkpoints at {list(filled1.checkpoints)}"
    )
    print(
        f"turn 2 {n2} prompt tokens, user starts {u2}, common prefix with turn 1 {lcp}, cache_n {cache_n} "
        f"(predicted {restored_prefix(filled1, lcp, n2)})"
    )
    # what the proxy replays (kvproxy.scoring.cached_prefix): turn 1's calls up to cache_n, then
    # llama-server's loop from there; None when no guess predicts cache_n
    cached = replay_calls(PromptFill(), [Prompt(tuple(p1), tuple(u1))], Prompt(tuple(p2), tuple(u2)), cache_n)
    variants: dict[str, Calls] = {"scratch": fill2.calls(n2, cuts_apply=True)}
    if cached is not None:
        variants["cached"] = list(cached)
    else:
        print(f"cache_n {cache_n} is not the predicted one: not replayable")
    if 0 < lcp < n2:  # turn 1's calls up to the whole common prefix, as if nothing was restored
        variants["cached, no restore"] = list(fill2.after(filled1, n2, min(lcp, n1)).calls)
    import llama_cpp
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)  # llama.cpp's own log: errors only
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = args.n_gpu_layers
    model = _internals.LlamaModel(path_model=str(model_path), params=params, verbose=False)
    print(f"| replay of turn 2 ({kv}) | prompt calls | served vs replay, mean coarse KL | max per token |")
    print("|---|---|---|---|")
    for name, calls in variants.items():
        r = Replay(model, 2048, 2048, args.threads, kv_type=GGML_TYPES[kv])
        try:
            mine = r.rows(p2, toks, calls)
        finally:
            r.close()
        kl = [
            coarse_kld_row(ids, lps, ids, exact_logprobs(m)[ids].tolist())
            for (ids, lps), m in zip(rows, mine, strict=True)
        ]
        print(f"| {name} | {calls} | {np.mean(kl):.2e} | {np.max(kl):.2e} |")


if __name__ == "__main__":
    main()
