"""What teacher-forced scoring over HTTP costs per generated token, side by side in one run:

* per-position scoring on a plain llama-server (f16 KV, ``--swa-full -np 1``): one ``n_predict: 1``
  request per position with the whole prefix as token ids and ``cache_prompt: true``;
* the kvproxy score route (``kvproxy backend``: q4_0 and f16 contexts on one set of weights, one
  request per job, exact full-vocabulary KLD of both configs);
* for scale, generating the same tokens on a q4_0 llama-server.

    .venv/bin/python benchmarks/http_scoring_cost.py [--tokens 64] [--prompt-words 120] [--repeats 3]

Starts its own servers on loopback (built by scripts/build-llama-tools.sh) and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.corpus import english_text
from kvproxy.model.chat_template import GEMMA_TEMPLATE
from kvproxy.scoring.job import PrimaryReport
from kvproxy.scoring.llama_server import LlamaServerReference, prompt_tokens_chat
from kvproxy.scoring.score_client import ScoreRouteReference, probe_score_route
from kvproxy.upstream.replicas import ReplicaPool, Timeouts
from tests.conftest import start_server, stop_server
from tests.llama_servers import llama_servers


async def measure(q4_url: str, f16_url: str, backend_url: str, tokens: int, words: int, repeats: int) -> None:
    messages = [{"role": "user", "content": " ".join(english_text().split()[:words])}]
    t = Timeouts()
    primary, ref_pool, score_pool = (ReplicaPool([u], t) for u in (q4_url, f16_url, backend_url))
    async with httpx.AsyncClient(timeout=600) as http:
        gen_times, report = [], PrimaryReport()
        for _ in range(repeats):
            start = time.perf_counter()
            r = (
                await http.post(
                    f"{q4_url}/v1/chat/completions",
                    json={
                        "messages": messages,
                        "max_tokens": tokens,
                        "temperature": 0,
                        "logprobs": True,
                        "top_logprobs": 20,
                        "cache_prompt": False,
                    },
                )
            ).json()
            gen_times.append((time.perf_counter() - start) / tokens)
        report.add(r["choices"][0]["logprobs"]["content"])
    prompt = await prompt_tokens_chat(primary, messages)
    per_position = LlamaServerReference(ref_pool, top_k=20)
    info = await probe_score_route(score_pool)
    assert info is not None
    score_route = ScoreRouteReference(score_pool, info)
    n = len(report.token_ids)
    rows = []
    for name, ref in (
        ("per-position llama-server (top-20)", per_position),
        ("kvproxy score route (exact)", score_route),
    ):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await ref.score(prompt, report)
            times.append((time.perf_counter() - start) / n)
        rows.append((name, statistics.median(times)))
    gen = statistics.median(gen_times)
    print(
        f"prompt {len(prompt)} tokens, {n} generated tokens scored, median of {repeats} runs,"
        " one thread per server\n"
    )
    print(f"{'':40} {'ms/token':>9} {'x generation':>13}")
    print(f"{'generation on the q4_0 primary':40} {gen * 1000:>9.1f} {1.0:>13.2f}")
    for name, cost in rows:
        print(f"{name:40} {cost * 1000:>9.1f} {cost / gen:>13.2f}")
    for pool in (primary, ref_pool, score_pool):
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path("/tmp/kvproxy-bench")
    tmp.mkdir(exist_ok=True)
    template = tmp / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    tpl = ("--chat-template-file", str(template))
    with llama_servers(
        bundled_model_path(),
        tmp,
        ("-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-np", "1", *tpl),
        ("-fa", "on", "-np", "1", "--swa-full", *tpl),
    ) as (q4, f16):
        backend = start_server(
            "-ctk", "q4_0", "-ctv", "q4_0", "--ctx-size", "2048", "--threads", "1", command="backend"
        )
        try:
            asyncio.run(
                measure(q4.url, f16.url, backend.base_url, args.tokens, args.prompt_words, args.repeats)
            )
        finally:
            stop_server(backend)


if __name__ == "__main__":
    main()
