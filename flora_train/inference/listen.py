"""Where `flora-train serve` listens: the socket, bound before anything loads, and uvicorn running
the app (``server.create_app``) on it."""

from __future__ import annotations

import ipaddress
import socket

from fastapi import FastAPI

from flora_train.inference.trained import InferenceError


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the base loads: a port in use (or a host this machine does
    not have) is one error at once, not uvicorn's line after minutes of loading. ``port`` 0 takes
    a free one (``getsockname`` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn: a restart need not wait out TIME_WAIT)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InferenceError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to may be reachable
        return False


def run_app(app: FastAPI, sock: socket.socket) -> None:
    """Runs ``app`` (``server.create_app``) on ``sock`` (``listen_socket``) until interrupted."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
