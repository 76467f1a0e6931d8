"""The live what-if on real traffic, as a user runs it: the seed's finding per device (issue 27 part 3).

    python3 benchmarks/whatif_live.py [--ngl 99] [--requests 8] [--tokens 128]

Starts ``kvproxy serve`` (embedded Gemma 3 270M) served at ``--served`` (q8_0) with ``--what-if``
candidates (q4_0, q8_0/q4_0, q4_0/q8_0), sends ``--requests`` English-prose completions one at a
time with the shadow forced (``X-KVProxy-Shadow: force``: every request scored and replayed under
each candidate), waits until each is scored, then prints the what-if table from
``/kvproxy/v1/what-if`` (exact full-vocabulary KLD on the decode path, llama-perplexity's
statistics) and the seconds generation and scoring took. On a GPU (``--ngl 99``) this is the figure
for docs/what-if.md; on a CPU a small run (``--requests 2 --tokens 32``) checks the script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvproxy.corpus import english_text  # noqa: E402


def start(args: argparse.Namespace, port: int) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "kvproxy", "serve", "--port", str(port), "--no-probe",
        "-c", str(args.ctx), "-ngl", str(args.ngl), "-ctk", args.served.split("/")[0],
        "-ctv", args.served.split("/")[-1], "--shadow-rate", "1", "--what-if", args.what_if,
    ]  # fmt: skip
    if args.threads:
        command += ["-t", str(args.threads)]
    print("$", " ".join(command[1:]), flush=True)
    return subprocess.Popen(command, stdout=sys.stdout, stderr=sys.stderr, text=True, env=os.environ.copy())


def what_if(http: httpx.Client) -> dict[str, Any]:
    deployments = http.get("/kvproxy/v1/what-if").json()["deployments"]
    return dict(deployments[0]["what_if"])


def wait(condition: Any, limit: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (httpx.HTTPError, KeyError, IndexError, TypeError):
            pass
        time.sleep(step)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngl", type=int, default=0, help="layers on the GPU (99: all)")
    parser.add_argument("--served", default="q8_0", help="the served KV config (K/V)")
    parser.add_argument("--what-if", default="q4_0,q8_0/q4_0,q4_0/q8_0")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens a request")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="-t (0: kvproxy's default)")
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()

    server = start(args, args.port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600) as http:
            if not wait(lambda: http.get("/health").status_code == 200, 300):
                print("the server did not come up", file=sys.stderr)
                return 1
            model = http.get("/v1/models").json()["data"][0]["id"]
            text = english_text()
            generation_s = scoring_s = 0.0
            for i in range(args.requests):
                t0 = time.monotonic()
                r = http.post(
                    "/v1/completions",
                    headers={"X-KVProxy-Shadow": "force"},
                    json={
                        "model": model,
                        "prompt": text[2500 * i : 2500 * i + 1200],
                        "max_tokens": args.tokens,
                        "temperature": 0.7,
                        "seed": i,
                    },
                )
                r.raise_for_status()
                t1 = time.monotonic()
                # one at a time: with shadow jobs queued the what-if gives way (shed, counted)
                if not wait(lambda: what_if(http)["jobs"]["scored"] == i + 1, 600):  # noqa: B023
                    print("request", i, "was not scored in 600 s:", what_if(http)["jobs"], file=sys.stderr)
                    return 1
                generation_s += t1 - t0
                scoring_s += time.monotonic() - t1
            report(what_if(http), generation_s, scoring_s, args)
    finally:
        server.terminate()
        server.wait(30)
    return 0


def stat(kld: dict[str, Any], name: str, digits: int = 4) -> str:
    value = kld.get(name)
    return f"{value:.{digits}f}" if isinstance(value, float | int) else "-"


def report(w: dict[str, Any], generation_s: float, scoring_s: float, args: argparse.Namespace) -> None:
    print()
    print(
        f"served {w['served']}, reference {w['reference']}, score path {w['score_path']}, "
        f"n_ctx {w['n_ctx']}, {w['scored_tokens']} positions, jobs {w['jobs']}"
    )
    print(f"generation {generation_s:.1f} s, scoring + what-if after each answer {scoring_s:.1f} s (wall)")
    print()
    print(
        "| config | role | KV bytes/token | KV at n_ctx | mean KLD ± error | median | p99 | same top "
        "| Pareto |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in sorted(w["configs"], key=lambda c: c["bytes_per_token"]):
        k = c["kld"] or {}
        mean = f"{stat(k, 'mean')} ± {stat(k, 'mean_error')}"
        median, p99, same = stat(k, "median"), stat(k, "p99"), stat(k, "same_top", 3)
        print(
            f"| {c['config']} | {c['role']} | {c['bytes_per_token']:,} "
            f"| {c['allocated_bytes'] / 2**20:.1f} MiB | {mean} | {median} | {p99} | {same} "
            f"| {'yes' if c['pareto'] else 'no'} |"
        )
    print()
    print(f"cheapest within the KLD budget {w['kld_budget']}: {w['within_budget']}")


if __name__ == "__main__":
    sys.exit(main())
