"""``kvproxy ARGS`` in the test process, for refusals: an argument, setting or file that start-up
must refuse with one line and exit 2, before any model loads or any request is served.

A ``python -m kvproxy`` subprocess pays about 2 s of CPU for its imports before it reads a flag;
these tests run kvproxy's own console entry point (``kvproxy.cli.main``: the same one-line usage
errors and exit codes) under click's ``CliRunner`` isolation instead, which swaps stdin, stdout,
stderr and the environment for the call. A few tests keep the real subprocess (``run_cli``) to hold
the process-level behaviour itself. A command that gets past its checks would start serving: here
it fails the test at once instead of hanging it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

from click.testing import CliRunner

import kvproxy.cli.commands as commands

_serve = commands.run


def _never_serve(*_: Any, **__: Any) -> None:
    raise AssertionError("the command passed its start-up checks and would serve: not a refusal")


def run_cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``kvproxy ARGS`` through ``kvproxy.cli.main`` with the process's environment plus ``env``
    (``serve`` listens on port 0 unless ``env`` or ARGS say otherwise); its exit code and output."""
    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, httpx_level, argv = root.handlers[:], root.level, httpx_log.level, sys.argv
    code = 0
    with CliRunner().isolation(env={"KVPROXY_PORT": "0", **(env or {})}) as (out, err, _):
        sys.argv = ["kvproxy", *args]
        commands.run = _never_serve  # type: ignore[assignment]
        try:
            commands.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:  # serve's logging.basicConfig wrote to the isolated stderr: undone with the rest
            commands.run, sys.argv = _serve, argv
            root.handlers[:] = handlers
            root.setLevel(level)
            httpx_log.setLevel(httpx_level)
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(["kvproxy", *args], code, stdout, stderr)
