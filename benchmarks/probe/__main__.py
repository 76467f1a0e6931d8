"""The adversarial probe of issue 20, against a real ``kvproxy serve`` set up as in production
(``KVPROXY_API_KEYS`` with two keys, ``KVPROXY_ADMIN_TOKEN``, a 1,024-descriptor file limit).

    PYTHONPATH=. .venv/bin/python -m benchmarks.probe [--parts auth,bodies,schemas,slow,concurrency,faults]
        [--concurrency 300] [--slow 1100] [--serve-args "--ctx-size 4096"]

It starts the server itself (the fault part signals it and reads its log), runs the parts in that
order (faults last: it ends the server with SIGTERM), and prints the tally: attempts, passed,
failed, with every failure and what was seen. The concurrency part's memory and fairness checks
wait on the embedded backend's queue and slots work (issue 20, findings 1 and 4).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from benchmarks.probe import auth, bodies, concurrency, faults, schemas, slow
from benchmarks.probe.common import Tally, production_server

PARTS = ("auth", "bodies", "schemas", "slow", "concurrency", "faults")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument(
        "--concurrency", type=int, default=300, help="requests in the burst (the issue: 1,500)"
    )
    parser.add_argument("--slow", type=int, default=1100, help="slow connections")
    parser.add_argument("--file-limit", type=int, default=1024)
    parser.add_argument("--serve-args", default="", help="more `kvproxy serve` flags")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    tally = Tally()
    t0 = time.monotonic()
    with production_server(shlex.split(args.serve_args), args.file_limit) as target:
        print(f"probe: {target.base_url} (pid {target.pid}), parts {parts}")
        for part in PARTS:
            if part not in parts:
                continue
            start = time.monotonic()
            if part == "auth":
                auth.run(target, tally)
            elif part == "bodies":
                bodies.run(target, tally)
            elif part == "schemas":
                schemas.run(target, tally)
            elif part == "slow":
                slow.run(target, tally, args.slow)
            elif part == "concurrency":
                concurrency.run(target, tally, args.concurrency)
            elif part == "faults":
                faults.run(target, tally)
            n, ok = tally.counts.get(part, [0, 0])
            print(f"  {part}: {ok}/{n} passed in {time.monotonic() - start:.0f} s")
    print(f"\nprobe finished in {time.monotonic() - t0:.0f} s\n{tally.report()}")
    return 0 if tally.passed == tally.attempts else 1


if __name__ == "__main__":
    sys.exit(main())
