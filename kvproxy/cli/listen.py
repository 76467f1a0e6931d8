"""Listening sockets, bound before anything else starts, so that a port that cannot be had stops
start-up at once with one line naming the cause (exit 2), before a model is loaded or a banner
printed. uvicorn is then handed the bound sockets.

uvicorn binds only after the application's start-up, logs the OSError and exits 1 (or 3, when the
server object it leaves half built is read); an unresolvable host went the same way.
"""

from __future__ import annotations

import errno
import socket

from kvproxy.cli.options import fail

_CAUSES = {
    errno.EADDRINUSE: "the address is already in use (another process listens on it)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cause(exc: OSError) -> str:
    return _CAUSES.get(exc.errno or 0, (exc.strerror or str(exc)).lower())


def bind(host: str, port: int, what: str = "--host/--port") -> list[socket.socket]:
    """One listening socket per address ``host`` resolves to (as asyncio's ``create_server`` does);
    with port 0 they all share the port the first one got. A failure is a ``typer.Exit(2)``."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        where = f"cannot listen on {_where(host, port)} ({what})"
        raise fail(f"{where}: cannot resolve {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            ip = str(addr[0])
            if (family, ip) in seen:
                continue
            seen.add((family, ip))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bound_port = sockets[0].getsockname()[1] if len(sockets) > 1 else port
            try:
                sock.bind((ip, bound_port, *addr[2:]))
            except OSError as exc:
                where = f"cannot listen on {_where(ip, bound_port)} ({what})"
                raise fail(f"{where}: {_cause(exc)}") from None
            sock.set_inheritable(True)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def listen(host: str, port: int, metrics_port: int | None) -> tuple[list[socket.socket], list[socket.socket]]:
    """The main port's sockets and, with ``--metrics-port``, the metrics port's."""
    if metrics_port is not None and metrics_port == port:
        raise fail(f"--metrics-port {metrics_port} is --port too; give the metrics a port of their own")
    main = bind(host, port)
    try:
        metrics = bind(host, metrics_port, "--metrics-port") if metrics_port is not None else []
    except BaseException:
        for s in main:
            s.close()
        raise
    return main, metrics
