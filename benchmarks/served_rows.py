"""Position by position: llama-server's served top-20 logprobs against rows recomputed in process.

    .venv/bin/python benchmarks/served_rows.py [--server-threads 2] [--words 60] [--tokens 16]
        [--server-args=--ctx-checkpoints 0] [--variants one_batch,server,...]

Starts one llama-server (``-np 1 -c 2048 -fa on``, f16 KV, as tests/llama_servers.py does), asks it
for a greedy completion with top-20 logprobs (native ``/completion`` with the prompt's token ids from
``/tokenize``, and ``/v1/completions`` with the text), then recomputes every row with llama-cpp-python
on the same tokens: the prompt in the llama_decode calls a variant names (logits for its last token),
then one completion token a call. Each row's logprobs are read two ways:

* ``f64``: an exact log-softmax of llama.cpp's float32 logits (what kvproxy computes);
* ``srv``: llama-server's ``get_token_probabilities`` approximated: float32 ``expf(l - max)`` summed
  in a float32 accumulator (in vocabulary order; the server sums after ``std::partial_sort`` has
  reordered the tail, so this is close to, not exactly, its normalizer), ``p / sum``, then ``log``.

Then kvproxy's own ``EmbeddedScorer`` (decode path, f16) scores the same tokens twice: as it is, and
with its prompt prefill cut where llama-server cuts it (:func:`server_prompt_calls`).

Prints, per variant and served position, max |d logprob| over the served top-20, and the mean
coarse KL (kvproxy.kld.coarse_kld_row). Found: llama-server prefills the last 4 prompt tokens of a
Gemma 3 prompt in a call of their own (context checkpoints for SWA models); replaying that cut makes
every row agree up to a per-row constant of 1e-4 to 4e-4 (llama-server's float32 normalizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
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
Calls = list[tuple[int, int]]
Row = tuple[list[int], list[float]]  # served top-K ids and logprobs at one position


def server_logprobs(logits: np.ndarray) -> np.ndarray:
    """Close to llama-server's get_token_probabilities: float32 softmax, float32 running sum."""
    l32 = logits.astype(np.float32)
    e = np.exp(l32 - l32.max(), dtype=np.float32)
    s = np.cumsum(e, dtype=np.float32)[-1]  # one after the other, as the server's loop adds
    with np.errstate(divide="ignore"):
        out: np.ndarray = np.log((e / s).astype(np.float32).astype(np.float64))
    return out


def exact_logprobs(logits: np.ndarray) -> np.ndarray:
    l64 = logits.astype(np.float64)
    m = l64.max()
    out: np.ndarray = l64 - m - np.log(np.exp(l64 - m).sum())
    return out


def chunks(n: int, size: int) -> Calls:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def server_prompt_calls(n: int, n_batch: int = 2048, n_ubatch: int = 512, checkpoints: bool = True) -> Calls:
    """The llama_decode calls llama-server (server-context.cpp, update_slots) cuts a prompt of n
    tokens into, one slot, no cached prefix: at most n_batch tokens a call and, where it may make
    context checkpoints (``--ctx-checkpoints`` > 0, the default 32, and a model with SWA layers
    without ``--swa-full``, or recurrent state), a break where min(n_batch, 4 + n_ubatch) and where
    min(n_batch, 4) tokens remain ("process the last few tokens of the prompt separately", PR #20288).
    Chat prompts whose template yields message delimiters also break at user-message starts."""
    calls, pos = [], 0
    while pos < n:
        start = pos
        while pos < n and pos - start < n_batch:
            pos += 1
            if checkpoints and any(n == pos + min(n_batch, off) for off in (4 + n_ubatch, 4)):
                break
        calls.append((start, pos))
    return calls


class Replay:
    """One llama.cpp context (f16 KV unless ``kv_type`` names another GGML type, flash attention,
    SWA cache as llama-server's default)."""

    def __init__(
        self, model: Any, n_ctx: int, n_batch: int, threads: int, n_ubatch: int = 512, kv_type: int = 1
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_ubatch, 1
        p.n_threads = p.n_threads_batch = threads
        p.type_k = p.type_v = kv_type  # 1: GGML_TYPE_F16
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.swa_full = False
        p.no_perf = True
        self.ctx = _internals.LlamaContext(model=model, params=p, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = int(model.n_vocab())

    def _call(self, tokens: list[int], pos0: int, logits_last: bool) -> None:
        b = self.batch.batch
        b.n_tokens = len(tokens)
        for k, t in enumerate(tokens):
            b.token[k], b.pos[k], b.seq_id[k][0], b.n_seq_id[k] = t, pos0 + k, 0, 1
            b.logits[k] = logits_last and k == len(tokens) - 1
        self.ctx.decode(self.batch)

    def _row(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def rows(self, prompt: list[int], completion: list[int], calls: Calls) -> list[np.ndarray]:
        """The logits row predicting each completion token: prompt in ``calls``, then one token a call."""
        self.ctx.kv_cache_clear()  # type: ignore[no-untyped-call]
        for a, b in calls:
            self._call(prompt[a:b], a, b == len(prompt))
        out = [self._row()]
        for j, tok in enumerate(completion[:-1]):
            self._call([tok], len(prompt) + j, True)
            out.append(self._row())
        return out

    def close(self) -> None:
        self.batch.close()  # type: ignore[no-untyped-call]
        self.ctx.close()  # type: ignore[no-untyped-call]


def served(url: str, prompt_ids: list[int], text: str, tokens: int) -> dict[str, Any]:
    common = {"temperature": 0, "cache_prompt": False}
    native = httpx.post(
        f"{url}/completion",
        json={"prompt": prompt_ids, "n_predict": tokens, "n_probs": TOP_K, **common},
        timeout=600,
    ).json()
    oai = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": text, "max_tokens": tokens, "logprobs": TOP_K, **common},
        timeout=600,
    ).json()
    return {"native": native, "oai": oai}


def rows_of(positions: list[dict[str, Any]]) -> tuple[list[int], list[Row]]:
    toks, rows = [], []
    for p in positions:
        toks.append(int(p["id"]))
        top = p["top_logprobs"]
        rows.append(([int(t["id"]) for t in top], [float(t["logprob"]) for t in top]))
    return toks, rows


def compare(
    rows: list[Row], mine: list[np.ndarray], fn: Callable[[np.ndarray], np.ndarray]
) -> dict[str, Any]:
    dmax, kl = [], []
    for (ids, lps), logits in zip(rows, mine, strict=True):
        lp = fn(logits)[ids]
        dmax.append(float(np.max(np.abs(lp - np.asarray(lps)))))
        kl.append(coarse_kld_row(ids, lps, ids, lp.tolist()))
    return {"max_d": dmax, "coarse_kl_mean": float(np.mean(kl))}


def show(name: str, res: dict[str, Any]) -> None:
    per_pos = " ".join(f"{x:.1e}" for x in res["max_d"])
    print(f"{name:34s} KL {res['coarse_kl_mean']:.2e} | max|d| per position {per_pos}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server-threads", type=int, default=2, help="llama-server -t, and the replays'")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--words", type=int, default=60, help="prompt: the first WORDS words of the corpus")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--variants", default="one_batch,split_last,server,server_t1,server_t2")
    ap.add_argument("--server-args", default="", help="more llama-server flags, e.g. '--ctx-checkpoints 0'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model_path = bundled_model_path()
    text = " ".join(english_text().split()[: args.words])
    logs = Path(tempfile.mkdtemp(prefix="served-rows-"))
    t = args.server_threads
    srv = start_llama_server(
        model_path, logs, "-np", "1", "-fa", "on", "-t", str(t), "-c", str(args.ctx),
        *args.server_args.split(),
    )  # fmt: skip
    try:
        prompt_ids = httpx.post(
            f"{srv.url}/tokenize", json={"content": text, "add_special": True, "parse_special": True}
        ).json()["tokens"]
        got = served(srv.url, prompt_ids, text, args.tokens)
    finally:
        srv.kill()
    toks, rows = rows_of(got["native"]["completion_probabilities"])
    oai_toks, oai_rows = rows_of(got["oai"]["choices"][0]["logprobs"]["content"])
    n = len(prompt_ids)
    print(f"llama-server -t {t} {args.server_args}: prompt {n} tokens from /tokenize "
          f"(first {prompt_ids[:3]}); "
          f"/completion prompt_n {got['native']['timings']['prompt_n']}, "
          f"/v1/completions prompt_tokens {got['oai']['usage']['prompt_tokens']}")  # fmt: skip
    same = oai_toks == toks and all(a == b for a, b in zip(oai_rows, rows, strict=True))
    print(f"/completion (token ids) and /v1/completions (text) served identical tokens and rows: {same}")
    srv_calls = server_prompt_calls(n)
    print(f"llama-server's prompt calls with context checkpoints: {srv_calls}\n")

    import llama_cpp
    from llama_cpp import _internals

    llama_cpp.llama_backend_init()
    model = _internals.LlamaModel(
        path_model=str(model_path), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    variants: dict[str, tuple[int, int, int, Calls]] = {  # name: n_ctx, n_batch, threads, prompt calls
        "one_batch": (args.ctx, 512, t, chunks(n, 512)),  # kvproxy's decode replay
        "one_batch_t1": (args.ctx, 512, 1, chunks(n, 512)),
        "one_batch_t2": (args.ctx, 512, 2, chunks(n, 512)),
        "one_batch_ctx4096": (4096, 512, t, chunks(n, 512)),
        "one_batch_b2048": (args.ctx, 2048, t, chunks(n, 2048)),
        "split_last": (args.ctx, 512, t, [(0, n - 1), (n - 1, n)]),
        "ub1": (args.ctx, 512, t, chunks(n, 1)),
        "server": (args.ctx, 2048, t, srv_calls),
        "server_t1": (args.ctx, 2048, 1, srv_calls),
        "server_t2": (args.ctx, 2048, 2, srv_calls),
        "server_ctx4096": (4096, 2048, t, srv_calls),
    }
    results: dict[str, Any] = {"prompt": prompt_ids, "completion": toks, "server_calls": srv_calls}
    for name in args.variants.split(","):
        n_ctx, n_batch, threads, calls = variants[name]
        r = Replay(model, n_ctx, n_batch, threads)
        try:
            mine = r.rows(prompt_ids, toks, calls)
        finally:
            r.close()
        res: dict[str, Any] = {
            how: compare(rows, mine, f) for how, f in (("f64", exact_logprobs), ("srv", server_logprobs))
        }
        res["greedy_matches"] = [int(np.argmax(m)) for m in mine] == toks
        results[name] = res
        show(f"{name} (f64)", res["f64"])
        show(f"{name} (srv)", res["srv"])

    # kvproxy's own decode-path scorer, as it is and with its prompt prefill cut like llama-server's
    from kvproxy.backends.base import KVConfig
    from kvproxy.config import KVCacheType
    from kvproxy.scoring.embedded import EmbeddedScorer

    f16 = KVConfig(KVCacheType.F16, KVCacheType.F16)

    def server_cut_prefill(self: EmbeddedScorer, ctx: Any, prompt: list[int], seq: int) -> None:
        ctx.kv_cache_seq_rm(seq, -1, -1)
        for a, b in server_prompt_calls(len(prompt)):
            for i in range(a, b, 512):  # a call of up to n_batch runs as micro-batches of n_ubatch
                j = min(i + 512, b)
                self._fill(prompt[i:j], range(i, j), [seq] * (j - i), int(j == len(prompt)))
                ctx.decode(self._batch)

    print()
    for name, patch in (("kvproxy scorer", None), ("kvproxy scorer, server cuts", server_cut_prefill)):
        sc = EmbeddedScorer(
            model, primary=f16, reference=f16, n_ctx=args.ctx, threads=t, flash_attn=True, batch=512,
            path="decode",
        )  # fmt: skip
        if patch is not None:
            sc._prefill_prompt = patch.__get__(sc)  # type: ignore[method-assign]
        try:
            scores = sc.score(prompt_ids, toks, [ids for ids, _ in rows])
        finally:
            sc.close()
        lps = scores.check_logprobs or []
        res = {
            "max_d": [float(np.max(np.abs(np.subtract(a, b)))) for a, (_, b) in zip(lps, rows, strict=True)],
            "coarse_kl_mean": float(
                np.mean([coarse_kld_row(i, b, i, list(a)) for a, (i, b) in zip(lps, rows, strict=True)])
            ),
        }
        results[name] = res
        show(name, res)
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
