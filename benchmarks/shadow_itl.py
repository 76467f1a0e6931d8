"""What shadowing costs a client of a llama-server primary: TTFT and inter-token latency, shadowed
against unshadowed, measured side by side in one run (issue 25, finding 7).

    .venv/bin/python benchmarks/shadow_itl.py [--pairs 16] [--tokens 64] [--threads 1]

Starts, on loopback, from the pinned llama.cpp build (``KVPROXY_LLAMA_BIN`` or
scripts/build-llama-tools.sh) and the bundled Gemma 3 270M:

* the primary: ``llama-server -ctk q4_0 -ctv q4_0 -fa on -np 1`` on its defaults otherwise (Jinja on);
* an f16 llama-server reference (``-np 1 --swa-full``) for the top-K estimator;
* a ``kvproxy backend`` (exact scorer, q4_0 and f16 on the same weights);
* ``kvproxy serve`` with two deployments on that one primary, both at shadow rate 1.0: ``exact``
  (the default: shadowed requests go to the primary unchanged) and ``top-k`` (``primary_logprobs =
  true``: shadowed requests ask for the top-20 logprobs the top-K estimator compares).

Each arm gets ``--pairs`` pairs of streamed greedy chat requests (``--tokens`` tokens each,
``ignore_eos``, ``cache_prompt: false``, a different prompt per pair), one shadowed
(``X-KVProxy-Shadow: force``) and one not (``skip``), in alternating order, one at a time; before
each request the proxy's shadow queue is waited empty, so scoring (which shares these cores) never
overlaps a measured request: what is measured is what the proxy adds to the primary's request. A
third arm pairs unshadowed requests with unshadowed ones (A/A): the noise floor of the same run.
TTFT: request sent to first content chunk. ITL: gaps between content chunks (llama-server sends one
a token). Prints p50 and p90 of each and the shadowed/unshadowed ratio at p50; writes
shadow_itl.json to $OUT when set. Figures and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from kvproxy.backends.embedded import bundled_model_path
from kvproxy.corpus import english_text
from tests.conftest import start_server, stop_server
from tests.llama_servers import start_llama_server

DEPLOYMENTS = ("exact", "top-k")
# (label, deployment, the second arm's X-KVProxy-Shadow): each compared with the same deployment's
# unshadowed requests; the A/A arm (unshadowed against unshadowed) shows the run's noise floor
ARMS = (("exact", "exact", "force"), ("top-k", "top-k", "force"), ("A/A", "exact", "skip"))


def prompts(n: int, words: int = 48) -> list[str]:
    text = english_text().split()
    return [" ".join(text[i * 97 : i * 97 + words]) for i in range(n)]


def stream_once(
    http: httpx.Client, model: str, prompt: str, tokens: int, shadow: str
) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one streamed chat completion, as the client sees them."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,  # every request the same length
        "cache_prompt": False,  # every request its own prompt processing
    }
    arrivals: list[float] = []
    start = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-KVProxy-Shadow": shadow}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                arrivals.append(time.perf_counter())
    assert len(arrivals) >= tokens // 2, f"{len(arrivals)} content chunks for {tokens} tokens"
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - start, gaps


def wait_idle(http: httpx.Client, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = {d["name"]: d for d in http.get("/kvproxy/v1/status").json()["deployments"]}
        if all(d["shadow"]["queued"] == 0 and d["shadow"]["in_flight"] == 0 for d in st.values()):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError("the shadow queue did not empty")
        time.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = bundled_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="shadow-itl-"))
    t = ("-t", str(args.threads))
    primary = start_llama_server(
        model, tmp, "-ctk", "q4_0", "-ctv", "q4_0", "-fa", "on", "-np", "1", *t, jinja=True
    )
    f16 = start_llama_server(model, tmp, "-fa", "on", "-np", "1", "--swa-full", *t, jinja=True)
    backend = start_server(
        *("-ctk", "q4_0", "-ctv", "q4_0", "--reference-cache-type", "f16", "--ctx-size", "2048"),
        *("--threads", str(args.threads)),
        command="backend",
    )
    config = tmp / "deployments.toml"
    kv = 'cache_type_k = "q4_0", cache_type_v = "q4_0"'
    config.write_text(f"""
[[deployments]]
model = "exact"
shadow_rate = 1.0
primary = {{ urls = ["{primary.url}"], {kv} }}
reference = {{ urls = ["{backend.base_url}"] }}

[[deployments]]
model = "top-k"
shadow_rate = 1.0
primary_logprobs = true
primary = {{ urls = ["{primary.url}"], {kv} }}
reference = {{ urls = ["{f16.url}"] }}
""")
    proxy = start_server("--config", str(config))
    try:
        texts = prompts(args.pairs + 1)
        samples: dict[tuple[str, str], dict[str, list[float]]] = {
            (label, side): {"ttft": [], "itl": []} for label, _, _ in ARMS for side in "ab"
        }
        with httpx.Client(base_url=proxy.base_url, timeout=600) as http:
            for d in DEPLOYMENTS:  # warm-up: connections, caches, the reference's kind
                stream_once(http, d, texts[-1], 8, "force")
            wait_idle(http)
            for i in range(args.pairs):
                for label, d, second in ARMS:
                    sides = (("a", "skip"), ("b", second))
                    for side, shadow in sides if i % 2 == 0 else sides[::-1]:
                        wait_idle(http)
                        ttft, gaps = stream_once(http, d, texts[i], args.tokens, shadow)
                        samples[(label, side)]["ttft"].append(ttft)
                        samples[(label, side)]["itl"].extend(gaps)
            status = wait_idle(http)
    finally:
        stop_server(proxy)
        stop_server(backend)
        for server in (primary, f16):
            server.process.terminate()
            server.process.wait(timeout=30)
    rows = []
    for label, d, second in ARMS:
        base, shadowed = samples[(label, "a")], samples[(label, "b")]
        row: dict[str, Any] = {"deployment": label, "second_arm": second}
        for name, s in (("unshadowed", base), ("shadowed", shadowed)):
            for metric in ("ttft", "itl"):
                row[f"{name}_{metric}_p50_ms"] = 1000 * pct(s[metric], 50)
                row[f"{name}_{metric}_p90_ms"] = 1000 * pct(s[metric], 90)
        row["itl_p50_ratio"] = row["shadowed_itl_p50_ms"] / row["unshadowed_itl_p50_ms"]
        row["ttft_p50_ratio"] = row["shadowed_ttft_p50_ms"] / row["unshadowed_ttft_p50_ms"]
        sh = status[d]["shadow"]  # the deployment's, over the whole run
        row["shadow"] = {k: sh[k] for k in ("sampled", "scored", "dropped", "failed", "skipped", "token_ids")}
        rows.append(row)
    return {"pairs": args.pairs, "tokens": args.tokens, "threads": args.threads, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of each server")
    args = parser.parse_args()
    result = run(args)
    print(f"{args.pairs} pairs of {args.tokens}-token streams an arm, one at a time (ms)")
    print(f"{'deployment':<10} {'arm':<11} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8}")
    for row in result["rows"]:
        for arm in ("unshadowed", "shadowed"):
            name = arm if row["second_arm"] == "force" or arm == "unshadowed" else "unshadowed"
            print(
                f"{row['deployment']:<10} {name:<11} {row[f'{arm}_ttft_p50_ms']:>9.2f} "
                f"{row[f'{arm}_ttft_p90_ms']:>9.2f} {row[f'{arm}_itl_p50_ms']:>8.2f} "
                f"{row[f'{arm}_itl_p90_ms']:>8.2f}"
            )
        print(
            f"{row['deployment']:<10} second/first arm at p50: ITL {row['itl_p50_ratio']:.3f}, "
            f"TTFT {row['ttft_p50_ratio']:.3f}; shadow jobs {row['shadow']}"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "shadow_itl.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
