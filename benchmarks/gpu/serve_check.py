"""`kvproxy serve` on a GPU, as a user would run it, checked end to end with the official client.

    python3 benchmarks/gpu/serve_check.py [--n-gpu-layers 99] [--requests 16]

Starts ``kvproxy serve -ngl N --shadow-rate 1.0`` (the embedded default: Gemma 3 270M, q4_0 K/V),
sends chat completions (streamed and not) and completions with the ``openai`` client, waits until
every one is scored, then saves the banner, ``/metrics`` and ``/kvproxy/v1/status`` to $OUT (the
status also renders the live page offline, for its screenshot) and prints what they say about the
device, the score path, the KLD and the GPU memory of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import httpx
import openai

from tests.conftest import start_server, stop_server

PROMPTS = [
    "Write one sentence about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of copper.",
    "What does a compiler do?",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-gpu-layers", type=int, default=99)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    t0 = time.monotonic()
    srv = start_server(
        "-ngl", str(args.n_gpu_layers), "--shadow-rate", "1.0", "--ctx-size", "4096", timeout=300
    )
    print(f"ready after {time.monotonic() - t0:.1f} s", flush=True)
    try:
        client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        for i in range(args.requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 3 == 0:
                stream = client.chat.completions.create(
                    model=srv.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=args.tokens,
                    stream=True,
                    temperature=0.7,
                )
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            elif i % 3 == 1:
                chat = client.chat.completions.create(
                    model=srv.model, messages=[{"role": "user", "content": prompt}], max_tokens=args.tokens
                )
                text = chat.choices[0].message.content or ""
            else:
                done = client.completions.create(model=srv.model, prompt=prompt, max_tokens=args.tokens)
                text = done.choices[0].text
            assert text, f"request {i} returned no text"
        http = httpx.Client(base_url=srv.base_url, timeout=60)
        deadline = time.monotonic() + 300
        while True:
            status = http.get("/kvproxy/v1/status").json()
            shadow = status["deployments"][0]["shadow"]
            if (
                shadow["scored"] + shadow["failed"] + shadow["dropped"] >= args.requests
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
        metrics = http.get("/metrics").text
    finally:
        stop_server(srv)
    (out / "serve_status.json").write_text(json.dumps(status, indent=2))
    (out / "serve_metrics.txt").write_text(metrics)
    (out / "serve_banner.txt").write_text("".join(srv.output))
    d = status["deployments"][0]
    k = d["kld"]["since_start"]
    print("".join(line for line in srv.output if line.startswith(("kvproxy", "  ", "ready"))))
    print(f"score path {d['score_path']}, devices {d.get('devices')}, shadow {d['shadow']}")
    print(
        f"mean KLD {k['mean']:.4f} ± {k['mean_error']:.4f} over {k['tokens']} tokens, "
        f"same top {k['same_top']:.3f}"
    )
    print(f"status gpu: {status['gpu']}")
    for line in metrics.splitlines():
        if re.match(r"kvproxy_(gpu_|llama_context_device)", line):
            print(line)


if __name__ == "__main__":
    main()
