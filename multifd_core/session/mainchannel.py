"""The native main channel's I/O: a socket under a sans-IO ``Connection``.

All protocol rules live in ``wire.connection``; this module only moves its bytes, with
deadlines: ``receive`` gives up at ``deadline`` (a whole handshake or message), and calls
``on_idle`` while it waits so the caller can end the wait on its own conditions (a failed
channel, no progress anywhere).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable

from multifd_core.engine.sockio import sendmsg_all
from multifd_core.errors import MultiFDError, TransportError
from multifd_core.wire.connection import NEED_DATA, Connection, Event

#: How often a waiting ``receive`` wakes to call ``on_idle``.
POLL = 0.2
_CHUNK = 1 << 20


class DeadlinePassed(TransportError):
    """A message did not arrive whole by its deadline (a peer trickling bytes)."""


class MainChannel:
    """Sends and receives the events of ``conn`` on ``sock`` (timeouts in seconds)."""

    def __init__(self, sock: socket.socket, conn: Connection, *, timeout: float) -> None:
        self.sock = sock
        self.conn = conn
        self.timeout = timeout
        self._buf = bytearray(_CHUNK)

    def send(self, event: Event) -> None:
        self._write(self.conn.send(event))

    def send_probe(self, filler: bytes) -> None:
        """One raw PROBE frame of ``filler``."""
        self._write(self.conn.probe_frame(filler))

    def _write(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)
        try:
            sendmsg_all(self.sock, [data], len(data))
        except TimeoutError:
            raise TransportError(f"main channel: the peer stopped reading (no progress for "
                                 f"{self.timeout} s)") from None
        except OSError as exc:
            raise TransportError(f"main channel: send failed: {exc}") from None

    def receive(self, *, deadline: float | None = None,
                on_idle: Callable[[], None] | None = None) -> Event:
        """The peer's next event. Without ``on_idle``, ``timeout`` seconds without a byte
        fail it; with it, ``on_idle`` decides (it raises to end the wait)."""
        quiet_since = time.monotonic()
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise DeadlinePassed(f"a whole message by its deadline ("
                                     f"{self.conn.wanted()} more bytes awaited)")
            if not self._readable(POLL if deadline is None else min(POLL, deadline - now)):
                if on_idle is not None:
                    on_idle()
                elif time.monotonic() - quiet_since > self.timeout:
                    raise TransportError(f"main channel: no message for {self.timeout} s")
                continue
            try:
                n = self.sock.recv_into(self._buf, min(_CHUNK, max(self.conn.wanted(), 1 << 16)))
            except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
                continue
            except OSError as exc:
                raise TransportError(f"main channel: receive failed: {exc}") from None
            if n == 0:
                raise TransportError(f"main channel closed by the peer ({self._where()})")
            self.conn.receive_data(memoryview(self._buf)[:n])
            quiet_since = time.monotonic()

    def _where(self) -> str:
        return self.conn.partial() if self.conn.buffered() else "between messages"

    def _readable(self, timeout: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        except (OSError, ValueError) as exc:
            raise TransportError(f"main channel: {exc}") from None
        return bool(ready)

    def close_gently(self, budget: int = 1 << 16, wait: float = 0.2) -> None:
        """Close after our last message: half-close, then drain a little of what the peer
        still sends (bounded in bytes and time), so the close is a FIN and not a reset that
        could destroy our last message (a REFUSE or RESULT) before the peer read it."""
        close_gently(self.sock, budget, wait)

    def result_if_any(self) -> Event | None:
        """The peer's next event if it arrives within half a second (a failed receiver's
        RESULT); None otherwise."""
        try:
            return self.receive(deadline=time.monotonic() + 0.5)
        except MultiFDError:
            return None


def close_gently(sock: socket.socket, budget: int = 1 << 16, wait: float = 0.2) -> None:
    """See ``MainChannel.close_gently``."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(wait)
        deadline = time.monotonic() + wait
        while budget > 0 and time.monotonic() < deadline:
            chunk = sock.recv(min(budget, 1 << 14))
            if not chunk:
                break
            budget -= len(chunk)
    except (OSError, ValueError):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass
