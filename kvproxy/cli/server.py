"""Running the app under uvicorn with one drain deadline for requests and shadow jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import time
from types import FrameType

import typer
import uvicorn

from kvproxy.app import create_app
from kvproxy.cli.banner import describe_access, describe_limits
from kvproxy.cli.options import fail
from kvproxy.config import Settings
from kvproxy.deployments.build import Deployment
from kvproxy.deployments.embedded import EmbeddedDeployment
from kvproxy.deployments.http import HttpDeployment
from kvproxy.http.access import KeySet
from kvproxy.http.connections import ConnectionLimits, connection_budget, file_limit, guarded_protocol
from kvproxy.telemetry.metrics import Metrics
from kvproxy.telemetry.server import start_metrics_server
from kvproxy.upstream.replicas import CONNECTIONS_PER_REPLICA


class DrainingServer(uvicorn.Server):
    """uvicorn's server, noting when the exit signal came: one drain deadline for the requests in
    flight and the shadow jobs queued after them.

    A drained server exits 0. uvicorn's own ``handle_exit`` records the signal and raises it again
    once it is done, so the process would die of SIGTERM (-15) after a clean drain; this one does
    what it does (exit, or force on a second Ctrl-C) without recording the signal."""

    def __init__(self, config: uvicorn.Config, drain: DrainClock) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


class DrainClock:
    """Starts the app's drain deadline (``app.state.drain_deadline``) at the first exit signal."""

    def __init__(self, state: object, timeout: float) -> None:
        self.state = state
        self.timeout = timeout

    def begin(self, sig: int) -> None:
        if getattr(self.state, "drain_deadline", None) is None:
            self.state.drain_deadline = time.monotonic() + self.timeout  # type: ignore[attr-defined]
            logging.getLogger("kvproxy").info(
                "signal %d: draining for up to %.1f s (in-flight requests, then shadow jobs)",
                sig,
                self.timeout,
            )


def connection_limits(settings: Settings, deployments: list[Deployment]) -> ConnectionLimits:
    """The cap on client connections from the open-file limit, less what the upstream pools may
    hold (kvproxy.http.connections); a cap the limit cannot carry stops start-up (exit 2)."""
    upstream = 0
    for d in deployments:
        if isinstance(d, HttpDeployment):
            pools = [d.primary_pool, *([d.reference_pool] if d.reference_pool is not None else [])]
            upstream += sum(CONNECTIONS_PER_REPLICA * len(pool.replicas) for pool in pools)
    try:
        limits = connection_budget(file_limit(), upstream, settings.max_connections)
    except ValueError as exc:
        raise fail(str(exc)) from None
    return dataclasses.replace(
        limits, header_timeout=settings.header_timeout, body_timeout=settings.body_timeout
    )


def run(
    settings: Settings,
    deployments: list[Deployment],
    metrics: Metrics,
    sockets: list[socket.socket],
    metrics_sockets: list[socket.socket],
) -> None:
    """Serve on ``sockets`` (bound by kvproxy.cli.listen) until a signal; the metrics port's server
    on ``metrics_sockets``."""
    exit_code = 0
    server: DrainingServer
    waiting: set[asyncio.Future[None]] = set()

    def on_ready() -> None:
        """Every deployment started; the ready line waits until the socket listens too (the model
        can load before uvicorn has bound it, and `--port 0` is only known once it has)."""
        waiting.add(asyncio.ensure_future(announce_when_listening()))

    async def announce_when_listening() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.01)
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
        exit_code = 2  # a start-up failure, like every other (kvproxy.cli.options.fail)
        typer.echo(f"kvproxy: error: the model failed to load: {exc}", err=True)
        server.should_exit = True

    api_keys = [k.get_secret_value() for k in settings.api_keys]
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    asgi = create_app(
        deployments,
        on_ready=on_ready,
        on_load_failed=on_load_failed,
        metrics=metrics,
        api_keys=api_keys,
        admin_token=admin,
        max_body_bytes=settings.max_body_bytes,
        drain_timeout=settings.drain_timeout,
        max_tokens_default=settings.max_tokens_default,
        cors_origins=settings.cors_origins,
    )
    limits = connection_limits(settings, deployments)
    protocol = guarded_protocol(limits, lambda reason: metrics.connections_closed.labels(reason).inc())
    metrics.connections_open.set_function(lambda: len(protocol.table))
    typer.echo(describe_access(settings))
    typer.echo(
        f"  clients    {limits.max_connections:,} connections at most; headers within "
        f"{limits.header_timeout:g} s, bodies within {limits.body_timeout:g} s"
    )
    typer.echo(describe_limits(settings))
    config = uvicorn.Config(
        asgi,
        http=protocol,
        log_level=settings.log_level,
        access_log=False,
        # X-Forwarded-* rewriting is off: kvproxy neither logs nor redirects by client address, and
        # the middleware costs CPU on every request (docs/benchmarks.md)
        proxy_headers=False,
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish for this long, then cancel them
        # (uvicorn logs how many); the app's shutdown gives queued shadow jobs what is left
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]
    )
    server = DrainingServer(config, DrainClock(asgi.state, settings.drain_timeout))
    for sock in metrics_sockets:
        start_metrics_server(settings.host, 0, metrics.registry, KeySet([admin]), sock)
    if metrics_sockets:
        typer.echo(f"  metrics    http://{settings.host}:{settings.metrics_port}/metrics")
    server.run(sockets=sockets)
    if exit_code:
        raise typer.Exit(code=exit_code)
