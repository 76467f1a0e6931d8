"""The ``kvproxy`` commands.

Flags only override: each one left out falls through to ``KVPROXY_<NAME>`` and then to the default,
all resolved by the one :class:`~kvproxy.config.Settings` object, whose field descriptions and
defaults are also the flags' help (kvproxy.cli.options).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Protocol, cast

import typer

from kvproxy import __version__
from kvproxy.backends.embedded import resolve_model_path
from kvproxy.cli import calibrate as calibrate_command
from kvproxy.cli import llama_args
from kvproxy.cli.banner import describe_proxy, describe_startup
from kvproxy.cli.listen import listen
from kvproxy.cli.options import TYPES, fail, load_settings, setting_help
from kvproxy.cli.proxy import proxy_deployments
from kvproxy.cli.server import run
from kvproxy.config import KVCacheType, ScorePath, Settings
from kvproxy.deployments.build import Deployment, embedded_deployment
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.deployments.probe import probe as probe_model
from kvproxy.model.gguf_info import read_model_info
from kvproxy.model.memory import check_head_sizes
from kvproxy.telemetry.metrics import Metrics, default_metrics

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvproxy: serve llama.cpp with a quantized KV cache and measure what it costs.",
)


@app.command()
def serve(
    model: Annotated[Path | None, typer.Option(help=setting_help("model"))] = None,
    alias: Annotated[str | None, typer.Option(help=setting_help("alias"))] = None,
    cache_type_k: Annotated[
        KVCacheType | None,
        typer.Option("--cache-type-k", "-ctk", help=setting_help("cache_type_k", f"({TYPES})")),
    ] = None,
    cache_type_v: Annotated[
        KVCacheType | None, typer.Option("--cache-type-v", "-ctv", help=setting_help("cache_type_v"))
    ] = None,
    flash_attn: Annotated[
        bool | None, typer.Option("--flash-attn/--no-flash-attn", help=setting_help("flash_attn"))
    ] = None,
    ctx_size: Annotated[int | None, typer.Option("--ctx-size", "-c", help=setting_help("ctx_size"))] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help=setting_help("batch_size"))
    ] = None,
    host: Annotated[str | None, typer.Option(help=setting_help("host"))] = None,
    port: Annotated[int | None, typer.Option(help=setting_help("port"))] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help=setting_help("threads"))] = None,
    n_gpu_layers: Annotated[
        int | None, typer.Option("--n-gpu-layers", "-ngl", help=setting_help("n_gpu_layers"))
    ] = None,
    score_path: Annotated[ScorePath | None, typer.Option(help=setting_help("score_path"))] = None,
    parallel: Annotated[int | None, typer.Option("--parallel", "-np", help=setting_help("parallel"))] = None,
    max_queue: Annotated[int | None, typer.Option(help=setting_help("max_queue"))] = None,
    queue_timeout: Annotated[float | None, typer.Option(help=setting_help("queue_timeout"))] = None,
    log_level: Annotated[str | None, typer.Option(help=setting_help("log_level"))] = None,
    parse_special_in_content: Annotated[
        bool | None,
        typer.Option(
            "--parse-special-in-content/--no-parse-special-in-content",
            help=setting_help("parse_special_in_content"),
        ),
    ] = None,
    shadow_rate: Annotated[
        float | None, typer.Option(help=setting_help("shadow_rate", "In proxy mode the default is 0.1."))
    ] = None,
    primary_logprobs: Annotated[
        bool | None,
        typer.Option("--primary-logprobs/--no-primary-logprobs", help=setting_help("primary_logprobs")),
    ] = None,
    reference_cache_type: Annotated[
        KVCacheType | None, typer.Option(help=setting_help("reference_cache_type"))
    ] = None,
    shadow_queue_size: Annotated[int | None, typer.Option(help=setting_help("shadow_queue_size"))] = None,
    primary: Annotated[
        str | None,
        typer.Option(help="Proxy mode: llama-server URL(s) of the primary, comma-separated (replicas)."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Proxy mode: URL(s) of the reference: an f16-KV llama-server, or `kvproxy backend`."
        ),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help=setting_help("metrics_port"))] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="Deployments file (TOML): several deployments, routed by model."),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="API key clients must send (Authorization: Bearer KEY) on /v1 routes; repeatable. "
            "(env: KVPROXY_API_KEYS, comma-separated; the env keeps keys out of `ps`)",
        ),
    ] = None,
    admin_token: Annotated[str | None, typer.Option(help=setting_help("admin_token"))] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help=setting_help("max_body_bytes"))] = None,
    max_connections: Annotated[int | None, typer.Option(help=setting_help("max_connections"))] = None,
    header_timeout: Annotated[float | None, typer.Option(help=setting_help("header_timeout"))] = None,
    body_timeout: Annotated[float | None, typer.Option(help=setting_help("body_timeout"))] = None,
    drain_timeout: Annotated[float | None, typer.Option(help=setting_help("drain_timeout"))] = None,
    max_tokens_default: Annotated[int | None, typer.Option(help=setting_help("max_tokens_default"))] = None,
    upstream_max_body_bytes: Annotated[
        int | None, typer.Option(help=setting_help("upstream_max_body_bytes"))
    ] = None,
    upstream_max_event_bytes: Annotated[
        int | None, typer.Option(help=setting_help("upstream_max_event_bytes"))
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help=setting_help("cors_origins")
            .replace("Comma-separated in the env.", "Repeatable.")
            .replace("(env: KVPROXY_CORS_ORIGINS)", "(env: KVPROXY_CORS_ORIGINS, comma-separated)"),
        ),
    ] = None,
    schema_max_bytes: Annotated[int | None, typer.Option(help=setting_help("schema_max_bytes"))] = None,
    schema_max_depth: Annotated[int | None, typer.Option(help=setting_help("schema_max_depth"))] = None,
    schema_max_enum: Annotated[int | None, typer.Option(help=setting_help("schema_max_enum"))] = None,
    schema_max_branches: Annotated[int | None, typer.Option(help=setting_help("schema_max_branches"))] = None,
    schema_max_repeat: Annotated[int | None, typer.Option(help=setting_help("schema_max_repeat"))] = None,
    grammar_max_bytes: Annotated[int | None, typer.Option(help=setting_help("grammar_max_bytes"))] = None,
    probe: Annotated[bool | None, typer.Option("--probe/--no-probe", help=setting_help("probe"))] = None,
    what_if: Annotated[str | None, typer.Option(help=setting_help("what_if"))] = None,
    what_if_rate: Annotated[float | None, typer.Option(help=setting_help("what_if_rate"))] = None,
    what_if_kld_budget: Annotated[float | None, typer.Option(help=setting_help("what_if_kld_budget"))] = None,
) -> None:
    """Serve OpenAI chat completions from llama.cpp with a quantized KV cache.

    With no --primary/--config: llama.cpp in process (the embedded default). With --primary (and
    --reference) or --config: a proxy in front of llama-server processes.
    """
    # every flag named like its setting, given or not (None: not given, so the environment or the
    # default decides); the repeatable --api-key and --cors-origin are the ones whose names differ
    given = {name: value for name, value in locals().items() if name in Settings.model_fields}
    settings = load_settings(**given, api_keys=api_key or None, cors_origins=cors_origin or None)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise
    # the ports first: one that cannot be had stops start-up before a model loads (exit 2)
    sockets, metrics_sockets = listen(settings.host, settings.port, settings.metrics_port)
    metrics = default_metrics()
    deployments: list[Deployment]
    if config_file is not None or primary is not None:
        deployments = proxy_deployments(settings, primary, reference, config_file, metrics)
        typer.echo(describe_proxy(deployments))
    else:
        if reference is not None:
            raise fail("--reference needs --primary (the embedded default scores in process)")
        deployments = [_embedded(settings, metrics)]
    for d in deployments:
        if isinstance(d, EmbeddedDeployment) and settings.probe:
            _probe(d.backend.settings)
    run(settings, deployments, metrics, sockets, metrics_sockets)


def _probe(settings: Settings) -> None:
    """What llama.cpp would abort on ends start-up here, in a child, not in the server."""
    start = time.monotonic()
    reason = probe_model(settings)
    if reason is not None:
        raise fail(f"llama.cpp cannot serve {settings.model}: {reason}")
    typer.echo(
        f"  probe      loaded, generated and scored in a child process in {time.monotonic() - start:.1f} s"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def backend(ctx: typer.Context) -> None:
    """A scoring server for proxies: `kvproxy serve` on an embedded model, shadowing nothing itself.

    It serves the OpenAI routes and /kvproxy/v1/score (exact KLD of the primary's KV config against
    the reference's, on the same weights). Takes every embedded option of `serve`, e.g.
    `kvproxy backend --model m.gguf -ctk q4_0 -ctv q4_0 --reference-cache-type f16 --port 8090`.
    """
    args = list(ctx.args)
    if not any(a == "--shadow-rate" or a.startswith("--shadow-rate=") for a in args):
        args = ["--shadow-rate", "0", *args]
    code = app(["serve", *args], prog_name="kvproxy", standalone_mode=False)
    if isinstance(code, int) and code:  # serve's exit code (not standalone: returned, not raised)
        raise typer.Exit(code)


def _embedded(settings: Settings, metrics: Metrics) -> Deployment:
    try:
        path = resolve_model_path(settings.model)
        info = read_model_info(path)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:  # what llama.cpp would refuse the context for, before anything is loaded
        check_head_sizes(
            info.attention, settings.cache_type_k, settings.cache_type_v, flash_attn=settings.flash_attn
        )
        banner = describe_startup(settings, info)
    except ValueError as exc:  # e.g. a head size that does not fill the KV type's blocks
        raise fail(
            f"{info.path.name}: its KV cache cannot be {settings.cache_type_k}/{settings.cache_type_v}: {exc}"
        ) from None
    typer.echo(banner)
    try:
        return embedded_deployment(settings.model_copy(update={"model": path}), info, metrics=metrics)
    except ValueError as exc:  # a --what-if config the model's KV cache cannot have
        raise fail(f"{info.path.name}: {exc}") from None


app.command()(calibrate_command.calibrate)


@app.command("llama-server-args")
def llama_server_args(
    model: Annotated[
        Path | None, typer.Option("--model", help="The GGUF (default: the bundled Gemma 3 270M).")
    ] = None,
) -> None:
    """Print the llama-server arguments that serve MODEL with the chat template kvproxy uses for it
    (-m MODEL --jinja, and --chat-template-file where the GGUF has none): for proxy mode."""
    try:
        path = resolve_model_path(model)
        args = llama_args.llama_server_args(path, llama_args.cache_dir() / "templates")
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(llama_args.format_args(args))


@app.command()
def version() -> None:
    """Print kvproxy's version."""
    typer.echo(__version__)


def main() -> None:
    """The console script: a usage error (an unknown flag, a value a flag cannot take) is one line
    and exit 2, like every other start-up failure (kvproxy.cli.options.fail)."""
    try:
        code = app(prog_name="kvproxy", standalone_mode=False)
    except _CLICK_EXCEPTION as raised:
        exc = cast(_ClickException, raised)
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `kvproxy`: the help
            exc.show()
        else:
            message = " ".join(exc.format_message().split())
            typer.echo(f"kvproxy: error: {message} (see --help)", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


class _ClickException(Protocol):
    exit_code: int

    def show(self) -> None: ...

    def format_message(self) -> str: ...


# the click that typer runs on (typer vendors its own in recent releases): its usage errors' base
_CLICK_EXCEPTION: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)
