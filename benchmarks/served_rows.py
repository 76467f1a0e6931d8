"""Position by position: llama-server's served top-20 logprobs against rows recomputed in process.

    .venv/bin/python benchmarks/served_rows.py [--server-threads 2] [--tokens 16] [--words 60]

Starts one llama-server (``-np 1 -c 2048 -fa on``, f16 KV, like tests/llama_servers.py), asks it for a
greedy completion with top-20 logprobs (native ``/completion`` with the prompt's token ids, and
``/v1/completions`` with the text), then recomputes every row with llama-cpp-python on the same
tokens in several ways (prompt in one call then one token a call, as kvproxy's decode replay does;
threads; n_ctx; n_batch; prompt minus its last token). Each row's logprobs are computed two ways:

* ``f64``: an exact log-softmax of llama.cpp's float32 logits (what kvproxy computes);
* ``srv``: as llama-server's ``get_token_probabilities`` does it: float32 ``expf(l - max)`` summed
  one after the other in a float32 accumulator, ``p / sum`` in float32, then ``log``.

Prints, per variant, max |d logprob| over the served top-20 at each position, and the coarse KL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.corpus import english_text
from kvproxy.kld import coarse_kld_row
from tests.llama_servers import start_llama_server

TOP_K = 20


def server_logprobs(logits: np.ndarray) -> np.ndarray:
    """llama-server's get_token_probabilities: float32 softmax, float32 running sum in vocab order."""
    l32 = logits.astype(np.float32)
    e = np.exp(l32 - l32.max(), dtype=np.float32)
    # sequential float32 accumulation: np.cumsum on float32 adds one after the other
    s = np.cumsum(e, dtype=np.float32)[-1]
    p = (e / s).astype(np.float32)
    with np.errstate(divide="ignore"):
        return np.log(p.astype(np.float64))


def exact_logprobs(logits: np.ndarray) -> np.ndarray:
    l64 = logits.astype(np.float64)
    m = l64.max()
    return l64 - m - np.log(np.exp(l64 - m).sum())


class Replay:
    def __init__(self, model: Any, n_ctx: int, n_batch: int, n_ubatch: int, threads: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.llama_cpp = llama_cpp
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, n_batch, n_ubatch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = threads
        p.type_k = p.type_v = 1  # f16
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.swa_full = False
        p.no_perf = True
        self.ctx = _internals.LlamaContext(model=model, params=p, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=max(n_batch, 1), embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = int(model.n_vocab())

    def _call(self, tokens: list[int], pos0: int, logits_last: bool) -> None:
        b = self.batch.batch
        b.n_tokens = len(tokens)
        for k, t in enumerate(tokens):
            b.token[k], b.pos[k], b.seq_id[k][0], b.n_seq_id[k] = t, pos0 + k, 0, 1
            b.logits[k] = logits_last and k == len(tokens) - 1
        rc = self.ctx.decode(self.batch)

    def row(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def rows(self, prompt: list[int], completion: list[int], calls: list[tuple[int, int]]) -> list[np.ndarray]:
        self.ctx.kv_cache_clear()
        for a, b in calls:
            self._call(prompt[a:b], a, b == len(prompt))
        out = [self.row()]
        for j, tok in enumerate(completion[:-1]):
            self._call([tok], len(prompt) + j, True)
            out.append(self.row())
        return out

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def server_prompt_calls(n: int, n_batch: int = 2048, n_ubatch: int = 512, checkpoints: bool = True) -> list[tuple[int, int]]:
    """How llama-server (server-context.cpp, update_slots) cuts a prompt of n tokens into llama_decode
    calls: at most n_batch tokens a call and, when it may make context checkpoints (SWA models such as
    Gemma 3, recurrent ones), a break where min(n_batch, 4 + n_ubatch) and then min(n_batch, 4)
    tokens remain ("process the last few tokens of the prompt separately", llama.cpp PR #20288)."""
    calls, pos = [], 0
    while pos < n:
        start = pos
        while pos < n and pos - start < n_batch:
            pos += 1
            if checkpoints and any(n == pos + min(n_batch, off) for off in (4 + n_ubatch, 4)):
                break
        calls.append((start, pos))
    return calls


def served(url: str, prompt_ids: list[int], text: str, tokens: int) -> dict[str, Any]:
    native = httpx.post(
        f"{url}/completion",
        json={"prompt": prompt_ids, "n_predict": tokens, "temperature": 0, "n_probs": TOP_K,
              "cache_prompt": False},
        timeout=600,
    ).json()  # fmt: skip
    oai = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": text, "max_tokens": tokens, "temperature": 0, "logprobs": TOP_K, "cache_prompt": False},
        timeout=600,
    ).json()
    return {"native": native, "oai": oai}


def rows_of(positions: list[dict[str, Any]]) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
    toks, rows = [], []
    for p in positions:
        toks.append(int(p["id"]))
        rows.append(([int(t["id"]) for t in p["top_logprobs"]], [float(t["logprob"]) for t in p["top_logprobs"]]))
    return toks, rows


def compare(rows: list[tuple[list[int], list[float]]], mine: list[np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, fn in (("f64", exact_logprobs), ("srv", server_logprobs)):
        dmax, kl = [], []
        for (ids, lps), logits in zip(rows, mine, strict=False):
            lp = fn(logits)
            dmax.append(float(np.max(np.abs(lp[ids] - np.asarray(lps)))))
            kl.append(coarse_kld_row(ids, lps, ids, lp[ids].tolist()))
        out[name] = {"max_d": dmax, "coarse_kl_mean": float(np.mean(kl))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--variants", default="one_batch,split_last,server,server_t1")
    ap.add_argument("--server-args", default="", help="extra llama-server flags, e.g. '--ctx-checkpoints 0'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model_path = bundled_model_path()
    text = " ".join(english_text().split()[: args.words])
    logs = Path(tempfile.mkdtemp(prefix="served-rows-"))
    srv = start_llama_server(
        model_path, logs, "-np", "1", "-fa", "on", "-t", str(args.server_threads), "-c", str(args.ctx),
        *args.server_args.split(),
    )
    try:
        prompt_ids = httpx.post(
            f"{srv.url}/tokenize", json={"content": text, "add_special": True, "parse_special": True}
        ).json()["tokens"]
        got = served(srv.url, prompt_ids, text, args.tokens)
    finally:
        srv.kill()
    native_toks, native_rows = rows_of(got["native"]["completion_probabilities"])
    oai_toks, oai_rows = rows_of(got["oai"]["choices"][0]["logprobs"]["content"])
    print(f"prompt {len(prompt_ids)} tokens, first {prompt_ids[:3]}; native prompt_n "
          f"{got['native'].get('timings', {}).get('prompt_n')}, oai usage {got['oai'].get('usage')}")  # fmt: skip
    print("native == oai tokens:", native_toks == oai_toks,
          "; native vs oai rows max |d|:",
          max(float(np.max(np.abs(np.asarray(a[1]) - np.asarray(b[1])))) for a, b in zip(native_rows, oai_rows)))  # fmt: skip

    import llama_cpp
    from llama_cpp import _internals

    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = _internals.LlamaModel(path_model=str(model_path), params=mp, verbose=False)
    t = args.server_threads
    n = len(prompt_ids)
    srv_calls = server_prompt_calls(n)
    print("llama-server's prompt calls (default checkpoints):", srv_calls)
    variants = {  # name: (n_ctx, n_batch, threads, prompt calls)
        "one_batch": (args.ctx, 512, t, chunks(n, 512)),
        "one_batch_t1": (args.ctx, 512, 1, chunks(n, 512)),
        "one_batch_ctx4096": (4096, 512, t, chunks(n, 512)),
        "one_batch_b2048": (args.ctx, 2048, t, chunks(n, 2048)),
        "split_last": (args.ctx, 512, t, [(0, n - 1), (n - 1, n)]),
        "ub1": (args.ctx, 512, t, chunks(n, 1)),
        "server": (args.ctx, 2048, t, srv_calls),
        "server_t1": (args.ctx, 2048, 1, srv_calls),
        "server_t2": (args.ctx, 2048, 2, srv_calls),
        "server_ctx4096": (4096, 2048, t, srv_calls),
    }
    results: dict[str, Any] = {"prompt": prompt_ids, "completion": native_toks}
    for name in args.variants.split(","):
        n_ctx, n_batch, threads, calls = variants[name]
        r = Replay(model, n_ctx, n_batch, 512, threads)
        try:
            mine = r.rows(prompt_ids, native_toks, calls)
        finally:
            r.close()
        greedy = [int(np.argmax(m)) for m in mine]
        res = {"native": compare(native_rows, mine), "oai": compare(oai_rows, mine),
               "greedy_matches": greedy == native_toks}  # fmt: skip
        results[name] = res
        for side in ("native", "oai"):
            for how in ("f64", "srv"):
                d = res[side][how]
                print(f"{name:10s} {side:6s} {how}: KL {d['coarse_kl_mean']:.2e} max|d| per pos "
                      + " ".join(f"{x:.1e}" for x in d["max_d"]))  # fmt: skip
        print(f"{name:10s} greedy argmax equals served tokens: {res['greedy_matches']}")
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
