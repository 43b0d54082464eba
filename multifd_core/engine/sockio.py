"""Blocking socket I/O without copies: gather sends and scatter receives that finish the job.

Sockets are kept in blocking mode with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO), so one
``sendmsg`` or ``recvmsg_into(..., MSG_WAITALL)`` normally moves a whole packet; a stalled peer
surfaces as ``TimeoutError``. TLS sockets (``ssl.SSLSocket`` has no sendmsg/recvmsg_into and
no receive flags) take a per-buffer path with Python-level timeouts; plain sockets keep the
gather/scatter path.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence
from typing import Any

from multifd_core.errors import TransportError

_IOV_MAX = 1024
_WAITALL = socket.MSG_WAITALL


class PeerClosed(TransportError):
    """The peer closed the connection; ``at_boundary`` when no byte of the item had arrived."""

    def __init__(self, message: str, at_boundary: bool) -> None:
        super().__init__(message)
        self.at_boundary = at_boundary


def set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Blocking mode, with a kernel timeout on every send and receive (None: wait forever).

    TLS sockets get a Python-level timeout instead (a kernel timeout would surface inside
    OpenSSL as a spurious want-read error)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(timeout)
        return
    sock.settimeout(None)
    sec = 0.0 if timeout is None else max(timeout, 0.001)
    tv = struct.pack("ll", int(sec), int((sec % 1) * 1_000_000))
    for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, opt, tv)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    i = 0
    while n and i < len(views):
        size = views[i].nbytes
        if n >= size:
            n -= size
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return views[i:]


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    views = [memoryview(b).cast("B") for b in buffers]
    return [v for v in views if v.nbytes]


def sendmsg_all(sock: socket.socket, buffers: Sequence[Any], total: int | None = None) -> int:
    """Send every buffer (one ``sendmsg`` when the kernel takes it all, as it usually does)."""
    if isinstance(sock, ssl.SSLSocket):
        return _tls_send_all(sock, buffers)
    try:
        if total is not None and len(buffers) <= _IOV_MAX:
            sent = sock.sendmsg(buffers)
            if sent == total:
                return total
            views = _advance(_views(buffers), sent)
        else:
            views = _views(buffers)
            total = sum(v.nbytes for v in views)
        while views:
            sent = sock.sendmsg(views[:_IOV_MAX])
            views = _advance(views, sent)
    except BlockingIOError:
        raise TimeoutError("send timed out") from None
    return total


def recv_into_all(sock: socket.socket, buf: memoryview | bytearray, what: str = "data") -> None:
    """Fill ``buf`` completely; ``PeerClosed`` if the peer closes first."""
    view = memoryview(buf).cast("B")
    if isinstance(sock, ssl.SSLSocket):
        _tls_recv_into(sock, view, view.nbytes, 0, what)
        return
    want = view.nbytes
    got = 0
    try:
        while got < want:
            n = sock.recv_into(view[got:], want - got, _WAITALL)
            if n == 0:
                raise PeerClosed(f"connection closed after {got} of {want} bytes of {what}",
                                 at_boundary=got == 0)
            got += n
    except BlockingIOError:
        raise TimeoutError(f"receive timed out ({what})") from None


def recvmsg_into_all(sock: socket.socket, buffers: Sequence[Any], total: int,
                     what: str = "pages") -> None:
    """Scatter-receive straight into ``buffers`` (``total`` bytes) until all are full."""
    if isinstance(sock, ssl.SSLSocket):
        done = 0
        for v in _views(buffers):
            done = _tls_recv_into(sock, v, total, done, what)
        return
    try:
        got = 0
        views: list[memoryview] = list(buffers) if len(buffers) <= _IOV_MAX else _views(buffers)
        while True:
            n = sock.recvmsg_into(views[:_IOV_MAX], 0, _WAITALL)[0]
            if n == 0:
                raise PeerClosed(f"connection closed after {got} of {total} bytes of {what}",
                                 at_boundary=False)
            got += n
            if got >= total:
                return
            views = _advance(_views(views), n)
    except BlockingIOError:
        raise TimeoutError(f"receive timed out ({what})") from None


# --------------------------------------------------------------------------- TLS path


def _tls_send_all(sock: ssl.SSLSocket, buffers: Sequence[Any]) -> int:
    total = 0
    try:
        for v in _views(buffers):
            sock.sendall(v)
            total += v.nbytes
    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
        raise TimeoutError("send timed out") from None
    return total


def _tls_recv_into(sock: ssl.SSLSocket, view: memoryview, total: int, done: int,
                   what: str) -> int:
    """Fill ``view`` from a TLS socket; ``done`` bytes of ``total`` came before it."""
    want = view.nbytes
    got = 0
    try:
        while got < want:
            n = sock.recv_into(view[got:], want - got)
            if n == 0:
                raise PeerClosed(f"connection closed after {done + got} of {total} bytes of "
                                 f"{what}", at_boundary=done + got == 0)
            got += n
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise TimeoutError(f"receive timed out ({what})") from None
    return done + got
