"""Two llama.cpp processes on shared cores: why `make test`'s workers are pinned (tests/workers.py).

    .venv/bin/python benchmarks/omp_contention.py [--threads 2] [--processes 2] [--passive]

Each process loads the bundled Gemma 3 270M, prefills 200 tokens and decodes 60 one at a time, and
prints both times. llama.cpp's CPU backend here is built with OpenMP, whose threads spin at every
barrier before they sleep: with as many spinning threads as cores in each process, one process's
barriers wait on threads the other has preempted. On 2 cores, alone: decode 0.86 s; two processes
side by side: 46 and 50 s; with ``--passive`` (OMP_WAIT_POLICY=PASSIVE) 1.6 and 1.9 s, and 1.8 s
alone (2026-12-06, while the machine was otherwise quiet).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def child(threads: int) -> None:
    import llama_cpp

    from kvproxy.backends.embedded import bundled_model_path

    llm = llama_cpp.Llama(
        str(bundled_model_path()), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20)
    start = time.monotonic()
    llm.eval(tokens[:200])
    prefill = time.monotonic() - start
    llm.reset()
    llm.eval(tokens[:8])
    start = time.monotonic()
    for token in tokens[8:68]:
        llm.eval([token])
    print(f"threads={threads} prefill 200: {prefill:.2f} s, decode 60: {time.monotonic() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.threads)
        return
    env = {**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if args.passive else {})}
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads)]
    procs = [subprocess.Popen(command, env=env) for _ in range(args.processes)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
