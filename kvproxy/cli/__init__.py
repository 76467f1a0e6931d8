"""The ``kvproxy`` command line (typer): ``serve``, ``backend``, ``calibrate``, ``version``.

Importing this package loads nothing heavy: :func:`main` loads llama.cpp's libraries first for the
commands that may load a model (kvproxy.backends.native), then the commands themselves.
"""

from __future__ import annotations

import sys
from typing import Any

MODEL_COMMANDS = frozenset({"serve", "backend", "calibrate"})


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in MODEL_COMMANDS:
        from kvproxy.backends.native import load_llama_first

        load_llama_first()
    from kvproxy.cli.commands import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "app":  # the typer app (tests drive it with CliRunner)
        from kvproxy.cli.commands import app

        return app
    raise AttributeError(name)


__all__ = ["app", "main"]
