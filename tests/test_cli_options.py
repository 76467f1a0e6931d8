"""The flags and the settings object say the same: every `serve` flag named like a setting takes its
help (description, default, variable) from :class:`kvproxy.config.Settings`, so a default is
written once; and every setting a user may want is a flag."""

from __future__ import annotations

import typer.main

from kvproxy.cli import app
from kvproxy.cli.options import default_text
from kvproxy.config import Settings

# settings that are tuning knobs of the shadow path or the status, set by environment variable only;
# and the two lists, whose repeatable flags are named in the singular (checked below)
ENV_ONLY = {
    "shadow_chunk",
    "score_sequences",
    "status_window",
    "api_keys",
    "cors_origins",
    "prefill_chunk",
    "shadow_capture_mib",
}


def serve_params() -> dict[str, typer.core.click.Parameter]:
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    return {p.name: p for p in serve.params if p.name}


def test_every_setting_is_a_flag_whose_help_is_the_settings() -> None:
    params = serve_params()
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        assert name in params, f"setting {name} has no flag"
        help_text = params[name].help or ""  # type: ignore[attr-defined]
        assert field.description and help_text.startswith(field.description.split(";")[0][:40]), name
        assert f"Default: {default_text(name)}." in help_text, (name, help_text)
        assert f"(env: KVPROXY_{name.upper()})" in help_text, name
    assert "--api-key" in params["api_key"].opts and "KVPROXY_API_KEYS" in (params["api_key"].help or "")  # type: ignore[attr-defined]
    cors = params["cors_origin"]
    assert "--cors-origin" in cors.opts and cors.multiple  # type: ignore[attr-defined]
    description = Settings.model_fields["cors_origins"].description or ""
    assert (cors.help or "").startswith(description[:60]) and "KVPROXY_CORS_ORIGINS" in (cors.help or "")  # type: ignore[attr-defined]


def test_the_readme_options_table_shows_the_settings_defaults() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for flag, default in (
        ("--cache-type-k", "`q4_0`"),
        ("--ctx-size", "4096"),
        ("--batch-size", "512"),
        ("--shadow-queue-size", "64"),
        ("--score-path", "`decode`"),
        ("--parallel", "| 1 |"),
        ("--max-queue", "| 64 |"),
        ("--queue-timeout", "| 60 |"),
        ("--max-tokens-default", "1024"),
    ):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{flag}"))
        assert default in row, row
    assert Settings.model_fields["ctx_size"].default == 4096
    assert Settings.model_fields["batch_size"].default == 512
    assert Settings.model_fields["shadow_queue_size"].default == 64
    assert Settings.model_fields["parallel"].default == 1
    assert Settings.model_fields["max_queue"].default == 64
    assert Settings.model_fields["queue_timeout"].default == 60
    assert Settings.model_fields["prefill_chunk"].default == 128
    assert Settings.model_fields["max_tokens_default"].default == 1024
    assert "| `--cors-origin ORIGIN` (repeatable) | `KVPROXY_CORS_ORIGINS` (comma-separated) |" in readme
