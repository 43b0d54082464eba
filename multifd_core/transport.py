"""Addresses (``tcp:HOST:PORT``, ``unix:PATH``), listening and connecting sockets."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from multifd_core.errors import TransportError

SOCKET_BUFFER = 4 << 20


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str, *, default_host: str = "127.0.0.1") -> Address:
    """Parse ``tcp:HOST:PORT``, ``tcp:PORT``, ``HOST:PORT`` or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise TransportError(f"bad address {text!r}: unix: needs a path")
        return Address("unix", path=path)
    rest = text[4:] if text.startswith("tcp:") else text
    if rest.startswith("["):
        host, _, port_s = rest[1:].partition("]:")
    elif ":" in rest:
        host, _, port_s = rest.rpartition(":")
    else:
        host, port_s = default_host, rest
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise TransportError(f"bad address {text!r}: expected tcp:HOST:PORT or unix:PATH "
                             f"with a port 0..65535") from None
    return Address("tcp", host=host or default_host, port=port)


def _tune(sock: socket.socket) -> socket.socket:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    return sock


def listen(addr: Address, backlog: int = 260) -> socket.socket:
    """A listening socket; for unix: a stale socket file is replaced."""
    try:
        if addr.kind == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(addr.path)
        else:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
        sock.listen(backlog)
        return sock
    except OSError as exc:
        raise TransportError(f"cannot listen on {addr}: {exc.strerror or exc}") from None


def bound_address(sock: socket.socket, addr: Address) -> Address:
    """The address a listening socket actually has (resolves port 0)."""
    if addr.kind == "unix":
        return addr
    host, port = sock.getsockname()[:2]
    return Address("tcp", host=host, port=port)


def connect(addr: Address, *, timeout: float = 10.0, retry: bool = True) -> socket.socket:
    """Connect, retrying until ``timeout`` while the listener is not up yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if addr.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(addr.path)
            else:
                sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
            return _tune(sock)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if not retry or time.monotonic() > deadline:
                raise TransportError(f"cannot connect to {addr}: {exc.strerror or exc}") from None
            time.sleep(0.05)
        except OSError as exc:
            raise TransportError(f"cannot connect to {addr}: {exc.strerror or exc}") from None


def accept(listener: socket.socket, timeout: float | None) -> socket.socket:
    listener.settimeout(timeout)
    try:
        sock, _ = listener.accept()
    except TimeoutError:
        raise TransportError(f"no connection within {timeout} s") from None
    return _tune(sock)
