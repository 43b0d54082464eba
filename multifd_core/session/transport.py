"""Addresses (``tcp:HOST:PORT``, ``unix:PATH``), listening and connecting sockets, TLS, and
the connection gate a receiver accepts through."""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import socket
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` only if it is a socket nobody listens on (left by a dead process);
    any other file there is refused, never deleted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"cannot listen on unix:{path}: a file that is not a socket is "
                             "there (remove it, or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
        return
    except OSError:
        return  # let bind report it
    finally:
        probe.close()
    raise TransportError(f"cannot listen on unix:{path}: another process is listening there")


def listen(addr: Address, backlog: int = 260) -> socket.socket:
    """A listening socket; for unix: a stale socket (nobody listening) is replaced, any other
    file at the path is refused."""
    try:
        if addr.kind == "unix":
            _remove_stale_socket(addr.path)
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


def connect(addr: Address, *, timeout: float = 10.0, retry: bool = True,
            tls: ssl.SSLContext | None = None, server_hostname: str | None = None
            ) -> socket.socket:
    """Connect, retrying until ``timeout`` while the listener is not up yet; with ``tls``,
    complete a TLS handshake (the server's certificate checked against ``server_hostname``,
    by default the address's host)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if addr.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(addr.path)
            else:
                sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
            sock = _tune(sock)
            if tls is None:
                return sock
            return _tls_client(sock, tls, server_hostname or addr.host or "localhost", addr)
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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1, ::ffff:127.x)."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


# --------------------------------------------------------------------------- TLS


def server_context(cert: str, key: str | None = None, ca: str | None = None, *,
                   verify_peer: bool = False) -> ssl.SSLContext:
    """A TLS 1.2+ server context; ``verify_peer`` demands a client certificate signed by
    ``ca`` (mutual authentication, QEMU's ``verify-peer``)."""
    if verify_peer and ca is None:
        raise TransportError("--tls-verify-peer needs --tls-ca (the CA that signs client "
                             "certificates)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer and ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load TLS credentials: {exc}") from None
    return ctx


def client_context(ca: str | None = None, cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the server against ``ca`` (else the system
    store); ``cert``/``key`` are presented when the server asks for them."""
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load TLS credentials: {exc}") from None
    return ctx


def _tls_client(sock: socket.socket, ctx: ssl.SSLContext, hostname: str,
                addr: Address) -> ssl.SSLSocket:
    try:
        return ctx.wrap_socket(sock, server_hostname=hostname)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise TransportError(f"TLS handshake with {addr} timed out") from None
        raise TransportError(f"TLS handshake with {addr} failed: {exc}") from None


# --------------------------------------------------------------------------- gate

log = logging.getLogger("multifd.transport")


class Refusals:
    """Connections a listener refused: each is closed, logged as a warning on ``logger`` and
    its reason kept in ``reasons`` (the first 1000), for the caller to report."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.reasons: list[str] = []

    def __call__(self, sock: socket.socket, why: str) -> None:
        self.logger.warning("refused a connection: %s", why)
        if len(self.reasons) < 1000:
            self.reasons.append(why)
        try:
            sock.close()
        except OSError:
            pass


@dataclass
class _Pending:
    sock: socket.socket
    deadline: float
    handshaking: bool
    buf: bytearray = field(default_factory=bytearray)


_WAKE = object()


class ConnectionGate:
    """Accepts connections and reads each one's first ``prefix_len`` bytes (after a TLS
    handshake when ``tls`` is set) without letting any connection hold up the others.
    ``prefix_len`` may be a function of the bytes read so far (to read more once the first
    ones tell what the connection is).

    Every pending connection has its own deadline (``handshake_timeout``), at most
    ``max_pending`` are held (the oldest goes first), and nothing is sized from peer data.
    ``reject(sock, why)`` is called for every connection that fails; ``poll`` returns the
    ones that delivered their prefix, back in blocking mode.
    """

    def __init__(self, listener: socket.socket, prefix_len: int | Callable[[bytes], int], *,
                 reject: Callable[[socket.socket, str], None],
                 tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0,
                 max_pending: int = 64) -> None:
        self.listener = listener
        self.prefix_len = prefix_len
        self.reject = reject
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self._sel = selectors.DefaultSelector()
        self._pending: dict[int, _Pending] = {}
        listener.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, None)
        # ``wake`` ends a ``poll`` early (another thread has news for the poller).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)

    def wake(self) -> None:
        """Make the current or next ``poll`` return at once (thread-safe)."""
        try:
            self._wake_w.send(b"w")
        except OSError:  # full (a wake is already pending) or closed
            pass

    def poll(self, timeout: float) -> list[tuple[socket.socket, bytes]]:
        ready: list[tuple[socket.socket, bytes]] = []
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                self._accept(ready)
            elif key.data is _WAKE:
                try:
                    self._wake_r.recv(64)
                except OSError:
                    pass
            else:
                self._advance(key.data, ready)
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline < now]:
            stage = "TLS handshake" if p.handshaking else f"{self._want(p)}-byte opening"
            self._drop(p, f"no complete {stage} within {self.handshake_timeout} s "
                          f"(got {len(p.buf)} bytes)")
        return ready

    def close(self) -> None:
        for p in list(self._pending.values()):
            self._forget(p)
            try:
                p.sock.close()
            except OSError:
                pass
        try:
            self._sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        try:
            self.listener.settimeout(None)
        except OSError:
            pass

    # ------------------------------------------------------------------ internals

    def _accept(self, ready: list[tuple[socket.socket, bytes]]) -> None:
        for _ in range(16):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending.values(), key=lambda p: p.deadline)
                self._drop(oldest, f"more than {self.max_pending} connections waiting")
            sock = _tune(sock)
            sock.setblocking(False)
            handshaking = False
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
                except (OSError, ssl.SSLError) as exc:
                    self.reject(sock, f"TLS set-up failed: {exc}")
                    continue
                handshaking = True
            p = _Pending(sock, time.monotonic() + self.handshake_timeout, handshaking)
            self._pending[sock.fileno()] = p
            self._sel.register(sock, selectors.EVENT_READ, p)
            self._advance(p, ready)

    def _advance(self, p: _Pending, ready: list[tuple[socket.socket, bytes]]) -> None:
        sock = p.sock
        try:
            if p.handshaking:
                try:
                    sock.do_handshake()  # type: ignore[attr-defined]
                except ssl.SSLWantReadError:
                    self._sel.modify(sock, selectors.EVENT_READ, p)
                    return
                except ssl.SSLWantWriteError:
                    self._sel.modify(sock, selectors.EVENT_WRITE, p)
                    return
                p.handshaking = False
                self._sel.modify(sock, selectors.EVENT_READ, p)
            while len(p.buf) < self._want(p):
                try:
                    chunk = sock.recv(self._want(p) - len(p.buf))
                except (BlockingIOError, ssl.SSLWantReadError):
                    return
                except ssl.SSLWantWriteError:
                    self._sel.modify(sock, selectors.EVENT_WRITE, p)
                    return
                if not chunk:
                    self._drop(p, f"closed after {len(p.buf)} of {self._want(p)} opening "
                                  "bytes")
                    return
                p.buf += chunk
        except (OSError, ssl.SSLError) as exc:
            what = "TLS handshake failed" if p.handshaking else "receive failed"
            self._drop(p, f"{what}: {exc}")
            return
        self._deliver(p, ready)

    def _want(self, p: _Pending) -> int:
        n = self.prefix_len
        return n if isinstance(n, int) else n(bytes(p.buf))

    def _deliver(self, p: _Pending, ready: list[tuple[socket.socket, bytes]]) -> None:
        self._forget(p)
        p.sock.setblocking(True)
        ready.append((p.sock, bytes(p.buf)))

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending, why: str) -> None:
        self._forget(p)
        self.reject(p.sock, why)


def accept_until(gate: ConnectionGate, handle: Callable[[socket.socket, bytes], None],
                 done: Callable[[], bool], poll: float = 0.2) -> None:
    """Hand every connection that delivered its opening bytes to ``handle(sock, head)``,
    until ``done()``."""
    while not done():
        for sock, head in gate.poll(poll):
            handle(sock, head)


def endpoints(sock: socket.socket) -> str:
    """``local -> peer`` addresses of a connected socket, for logs."""
    try:
        return f"{_address_text(sock.getsockname())} -> {_address_text(sock.getpeername())}"
    except OSError:
        return "?"


def _address_text(addr: Any) -> str:
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"
