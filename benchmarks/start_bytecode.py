"""What a kvproxy process costs to start with and without byte code: why `make install` compiles
kvproxy's dependencies and `make test` compiles kvproxy (Makefile).

    .venv/bin/python benchmarks/start_bytecode.py [--runs 5] [--command "serve --help"]

Runs ``python -m kvproxy serve --help`` (imports the whole server: fastapi, pydantic, numpy,
llama_cpp, uvicorn, ...) several times each way, side by side, and prints the CPU seconds per start:

- ``byte code``: the venv as `make` leaves it.
- ``no byte code``: what a CI sandbox saw before (it sets PYTHONDONTWRITEBYTECODE, and the venv
  came from `pip install --no-compile`, or uv's default, with no byte code): the standard library
  compiled, the venv's packages and kvproxy not, and nothing kept. ``PYTHONPYCACHEPREFIX`` points at
  a folder into which only the standard library is compiled first (a few seconds, once), and
  ``PYTHONDONTWRITEBYTECODE`` is set, so every other module is compiled in every process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import sysconfig
import tempfile


def cpu_of(cmd: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one run of cmd (the children's rusage before and after)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--command", default="serve --help", help="kvproxy's arguments")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "kvproxy", *shlex.split(args.command)]
    with tempfile.TemporaryDirectory() as prefix:
        no_byte_code = {**os.environ, "PYTHONPYCACHEPREFIX": prefix, "PYTHONDONTWRITEBYTECODE": "1"}
        stdlib = sysconfig.get_paths()["stdlib"]
        print(f"compiling the standard library ({stdlib}) into {prefix} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-x", "site-packages", stdlib],
            env=no_byte_code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            check=False,  # some of the standard library's test data does not compile, on purpose
        )  # fmt: skip
        ways = {
            "byte code": {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"},
            "no byte code": no_byte_code,
        }
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.runs):  # interleaved, so both ways see the same machine
            for way, env in ways.items():
                times[way].append(cpu_of(cmd, env))
    print(f"kvproxy {args.command}: CPU seconds a start, {args.runs} runs each, interleaved")
    print(f"{'':14} {'median':>7} {'min':>7} {'max':>7}")
    medians = {}
    for way, ts in times.items():
        ts.sort()
        medians[way] = ts[len(ts) // 2]
        print(f"{way:14} {medians[way]:7.2f} {ts[0]:7.2f} {ts[-1]:7.2f}")
    print(f"no byte code / byte code: {medians['no byte code'] / medians['byte code']:.2f}x")


if __name__ == "__main__":
    main()
