"""The ``kvproxy`` command line (typer): ``serve``, ``backend``, ``calibrate``, ``version``."""

from kvproxy.cli.commands import app, main

__all__ = ["app", "main"]
