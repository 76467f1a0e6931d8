"""Flag help generated from the settings object, so a default is written in one place only
(:class:`kvproxy.config.Settings`), and the failure every bad setting ends in (exit 2, one line)."""

from __future__ import annotations

import enum
from typing import Any

import typer
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from kvproxy.config import KVCacheType, Settings

TYPES = ", ".join(t.value for t in KVCacheType)
# defaults that are computed or absent, said in words
_SHOWN = {
    "model": "the bundled Gemma 3 270M",
    "alias": "the GGUF's name",
    "threads": "all available cores",
    "n_gpu_layers": "all when the installed llama-cpp-python can offload (a CUDA build), else 0",
    "max_connections": "what the open-file limit leaves, at most 16,384",
    "cors_origins": "none (CORS off)",
    "what_if": "none (what-if off)",
}


def default_text(name: str) -> str:
    if name in _SHOWN:
        return _SHOWN[name]
    default = Settings.model_fields[name].default
    if default is None or default is PydanticUndefined:
        return "unset"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, enum.Enum):
        return str(default.value)
    return f"{default:,}" if isinstance(default, int) and default >= 10_000 else str(default)


def setting_help(name: str, extra: str = "") -> str:
    """The help of the flag for setting ``name``: its description, default and variable."""
    field = Settings.model_fields[name]
    text = f"{field.description} {extra}".strip()
    return f"{text} Default: {default_text(name)}. (env: KVPROXY_{name.upper()})"


def fail(message: str) -> typer.Exit:
    typer.echo(f"kvproxy: error: {message}", err=True)
    return typer.Exit(code=2)


def load_settings(**given: Any) -> Settings:
    """Settings from the flags actually given (None means not given) over the environment."""
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise fail(problems) from None
