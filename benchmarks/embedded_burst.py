"""A burst of concurrent 1-token chats against the embedded server, then idle: what RSS does.

    .venv/bin/python benchmarks/embedded_burst.py --requests 1500 [--max-queue 2000]
        [--queue-timeout 0] [--parallel 1] [--idle 20] [--n-gpu-layers N]

Starts ``kvproxy serve`` (the embedded default, shadow skipped per request with
``X-KVProxy-Shadow: skip``), warms it with a few requests, reads its RSS, sends ``--requests``
chats at once (each ``max_tokens: 1``, each its own connection, aiohttp), waits for every answer,
lets the server idle for ``--idle`` seconds and reads its RSS again. Prints one JSON line: RSS
before, at the peak (sampled every 100 ms) and after, the answers by status, whether every 503 had
a Retry-After and OpenAI's error shape, and the latency percentiles of the answered requests.

Issue 20's finding: before the fix RSS went from 437 MiB to 1,362 at 300 requests and 4,974 at 1,500,
and stayed there (each request's 3 MiB sampler buffer waited for a full garbage collection).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.burst import run_burst
from tests.conftest import start_server, stop_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-queue", type=int, default=2000)
    ap.add_argument("--queue-timeout", type=float, default=0)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--idle", type=float, default=20)
    ap.add_argument("--n-gpu-layers", type=int, default=None)
    ap.add_argument("--ctx-size", type=int, default=2048)
    args = ap.parse_args()
    flags = [
        "--ctx-size", str(args.ctx_size),
        "--parallel", str(args.parallel),
        "--max-queue", str(args.max_queue),
        "--queue-timeout", str(args.queue_timeout),
    ]  # fmt: skip
    if args.n_gpu_layers is not None:
        flags += ["--n-gpu-layers", str(args.n_gpu_layers)]
    server = start_server(*flags)
    try:
        figures = run_burst(server, args.requests, args.idle)
    finally:
        stop_server(server)
    print(json.dumps({"flags": flags, **figures}))


if __name__ == "__main__":
    main()
