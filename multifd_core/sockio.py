"""Blocking socket I/O without copies: gather sends and scatter receives that finish the job."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from multifd_core.errors import TransportError

_IOV_MAX = 1024


class PeerClosed(TransportError):
    """The peer closed the connection; ``at_boundary`` when no byte of the item had arrived."""

    def __init__(self, message: str, at_boundary: bool) -> None:
        super().__init__(message)
        self.at_boundary = at_boundary


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


def sendmsg_all(sock: socket.socket, buffers: Sequence[Any]) -> int:
    """Send every buffer with as few ``sendmsg`` calls as the kernel allows (no joining)."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    total = sum(v.nbytes for v in views)
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        views = _advance(views, sent)
    return total


def recv_into_all(sock: socket.socket, buf: memoryview | bytearray, what: str = "data") -> None:
    """Fill ``buf`` completely; ``PeerClosed`` if the peer closes first."""
    view = memoryview(buf).cast("B")
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerClosed(f"connection closed after {got} of {view.nbytes} bytes of {what}",
                             at_boundary=got == 0)
        got += n


def recvmsg_into_all(sock: socket.socket, buffers: Sequence[Any], what: str = "pages") -> None:
    """Scatter-receive straight into ``buffers`` until all are full."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    total = sum(v.nbytes for v in views)
    got = 0
    while views:
        n = sock.recvmsg_into(views[:_IOV_MAX])[0]
        if n == 0:
            raise PeerClosed(f"connection closed after {got} of {total} bytes of {what}",
                             at_boundary=False)
        got += n
        views = _advance(views, n)
