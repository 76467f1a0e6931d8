"""``--metrics-port``: /metrics on a port of its own, behind the admin token when there is one.

prometheus-client's ``start_http_server`` cannot check a token, so its WSGI app is served here
(same threaded stdlib server, in a daemon thread, request lines not logged) behind the same
constant-time check as the main port's admin routes (kvproxy.http.access).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from kvproxy.http.access import KeySet, RouteKind, bearer_token, refusal


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def guarded_metrics_app(registry: CollectorRegistry, admin_token: KeySet) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if admin_token:
            header = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1")
            token = bearer_token([(b"authorization", header)])
            if token is None or not admin_token.matches(token):
                err = refusal(RouteKind.ADMIN, presented=token is not None)
                start_response(
                    "401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer")]
                )
                return [json.dumps(err.body()).encode()]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


class _BoundServer(ThreadingWSGIServer):
    """The threaded WSGI server on a socket bound already (kvproxy.cli.listen binds every port
    before start-up goes further, so a taken port is named at once)."""

    bound: socket.socket | None = None

    def server_bind(self) -> None:
        if self.bound is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.bound
        self.server_address = self.socket.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    admin_token: KeySet,
    sock: socket.socket | None = None,
) -> int:
    """Serve in a daemon thread, on ``sock`` when given (bound, not yet listening), else on a socket
    bound to ``host:port`` here; returns the bound port."""
    server_class = type("_Server", (_BoundServer,), {"bound": sock, "address_family": _family(sock)})
    server: _BoundServer = make_server(
        host,
        port,
        guarded_metrics_app(registry, admin_token),
        server_class,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="kvproxy-metrics", daemon=True).start()
    return int(server.server_port)


def _family(sock: socket.socket | None) -> socket.AddressFamily:
    return sock.family if sock is not None else socket.AF_INET
