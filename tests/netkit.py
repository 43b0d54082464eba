"""Test kit for hostile peers and faults: raw packets, a scripted sender and receiver, a
byte-flipping TCP proxy, and checks that nothing was left running. Real sockets throughout."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from multifd_core import wire
from multifd_core.methods.registry import default_registry
from multifd_core.session import ReceiveSession
from multifd_core.session.transport import Address, bound_address, connect, listen
from multifd_core.wire import protocol
from multifd_core.wire.protocol import FRAME_LEN, Hello, Msg, Offer

PS = 4096
UUID = bytes(range(16))
IN_CI = bool(os.environ.get("CI"))


def require_method(name: str) -> None:
    """Skip (fail under CI) when method ``name`` is not installed and available."""
    reg = default_registry()
    if name in reg and reg.get(name).cls.available()[0]:
        return
    why = f"method {name} not installed: pip install -e plugins/{name}"
    if IN_CI:
        pytest.fail(why)
    pytest.skip(why)


# --------------------------------------------------------------------------- raw packets


def raw_packet(*, flags: int = 0, pages_alloc: int = 128, normal: int = 0, size: int = 0,
               num: int = 1, zero: int = 0, name: bytes = b"ram",
               offsets: list[int] | None = None, magic: int = wire.MAGIC,
               version: int = wire.VERSION) -> bytes:
    """A full-length RAM packet with every field as given (no validation)."""
    head = wire.RAM_FIXED.pack(magic, version, flags, pages_alloc, normal, size, num, zero, 0,
                               name)
    slots = np.zeros(wire.page_count(PS), dtype=">u8")
    offs = offsets or []
    slots[: len(offs)] = offs
    return head + slots.tobytes()


def frame(kind: int, body: bytes, *, version: int = protocol.PROTO_VERSION,
          magic: bytes = b"MFDS", length: int | None = None) -> bytes:
    return struct.pack(">4sHHI", magic, version, kind,
                       len(body) if length is None else length) + body


def hello_frame(channels: int = 2, blocks: list[tuple[str, int]] | None = None,
                uuid: bytes = UUID, **extra: Any) -> bytes:
    body = Hello(uuid, PS, channels, blocks or [("ram", 64 * PS)],
                 [Offer("none", 0, "0.1")], "none").to_body()
    body.update(extra)
    return protocol.encode(Msg.HELLO, body)


def read_msg(sock: socket.socket) -> tuple[Msg, dict[str, Any]]:
    head = recv_exact(sock, FRAME_LEN)
    kind, length = protocol.decode_frame(head)
    return kind, protocol.decode_body(recv_exact(sock, length))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


# --------------------------------------------------------------------------- endpoints


class Served:
    """A ``ReceiveSession`` serving on a loopback listener in a thread."""

    def __init__(self, session_kw: dict[str, Any] | None = None,
                 allocate: Callable[..., Any] | None = None) -> None:
        from multifd_core.engine.ram import RamBlock

        self.listener = listen(Address("tcp", host="127.0.0.1", port=0))
        self.addr = bound_address(self.listener, Address("tcp", host="127.0.0.1"))
        kw = {"timeout": 5.0, **(session_kw or {})}
        self.session = ReceiveSession(
            self.listener, allocate or (lambda n, ln, ps: RamBlock.zeros(n, ln, page_size=ps)),
            **kw)
        self.error: BaseException | None = None
        self.stats: Any = None
        self.thread = threading.Thread(target=self._run, name="test-serve", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stats = self.session.serve()
        except BaseException as exc:
            self.error = exc

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.addr.host, self.addr.port), timeout=10)
        return s

    def wait(self, timeout: float = 15.0) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the receive session did not end"
        self.listener.close()
        return self.error


class RawSender:
    """A scripted native-session sender: HELLO, ACCEPT, channels, then whatever a test does."""

    def __init__(self, served: Served, channels: int = 2, blocks: list[tuple[str, int]] |
                 None = None, uuid: bytes = UUID, connect: int | None = None) -> None:
        self.uuid = uuid
        self.main = served.connect()
        self.main.sendall(hello_frame(channels, blocks, uuid))
        kind, body = read_msg(self.main)
        assert kind is Msg.ACCEPT, body
        self.channels: list[socket.socket] = []
        for i in range(channels if connect is None else connect):
            self.connect_channel(served, i)

    def connect_channel(self, served: Served, cid: int) -> socket.socket:
        c = served.connect()
        c.sendall(wire.encode_init(self.uuid, cid))
        self.channels.append(c)
        return c

    def close(self) -> None:
        for s in [self.main, *self.channels]:
            try:
                s.close()
            except OSError:
                pass


@contextmanager
def fake_receiver(behaviour: Callable[[socket.socket, socket.socket], None]
                  ) -> Iterator[Address]:
    """A hostile or broken receiver: ``behaviour(listener, main)`` runs after it accepted the
    main channel (HELLO unread)."""
    lst = listen(Address("tcp", host="127.0.0.1", port=0))
    addr = bound_address(lst, Address("tcp", host="127.0.0.1"))
    held: list[socket.socket] = []

    def run() -> None:
        try:
            lst.settimeout(10)
            main, _ = lst.accept()
            held.append(main)
            behaviour(lst, main)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield addr
    finally:
        lst.close()
        t.join(10)
        for s in held:
            s.close()


# --------------------------------------------------------------------------- proxy


class FlipProxy:
    """A TCP proxy that flips one byte at stream offset ``flip_at`` of the first multifd
    channel (the first client connection opening with the multifd magic)."""

    def __init__(self, upstream: Address, flip_at: int | None) -> None:
        self.upstream = upstream
        self.flip_at = flip_at
        self.flipped = False
        self.captured = bytearray()
        self.lst = listen(Address("tcp", host="127.0.0.1", port=0))
        self.addr = bound_address(self.lst, Address("tcp", host="127.0.0.1"))
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._stop = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.lst.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # The receiver it fronts may not listen yet (its start races the sender's):
            # connect retries a refusal, as the sender does.
            server = connect(self.upstream, timeout=20)
            server.settimeout(None)
            self._socks += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        pos = 0
        target = False
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        if len(self.captured) < 64 << 20:
                            self.captured += data
                        if pos == 0 and data[:4] == b"\x11\x22\x33\x44" and not self.flipped \
                                and self.flip_at is not None:
                            target = True
                            self.flipped = True
                    if target and pos <= self.flip_at < pos + len(data):
                        buf = bytearray(data)
                        buf[self.flip_at - pos] ^= 0x01
                        data = bytes(buf)
                pos += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.lst.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


# --------------------------------------------------------------------------- leak checks


def engine_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("multifd") and t.is_alive())


def assert_no_engine_threads(within: float = 6.0) -> None:
    """No sender/receiver/acceptor thread outlives its session (given ``within`` s)."""
    deadline = time.monotonic() + within
    while engine_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_threads() == []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- processes, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(stderr: str, *needles: str) -> None:
    """A user error: one line, ``multifd: error: ...``, no traceback, holding ``needles``."""
    err = stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("multifd: error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def plant_links(out: Any, names: list[str], victims_dir: Any) -> dict[Any, bytes]:
    """A symlink in ``out`` at every name in ``names``, each to its own file in
    ``victims_dir``; returns each victim with its content."""
    out.mkdir(exist_ok=True)
    victims = {}
    for i, name in enumerate(names):
        victim = victims_dir / f"victim{i}"
        victim.write_bytes(b"precious %d\n" % i)
        (out / name).symlink_to(victim)
        victims[victim] = victim.read_bytes()
    return victims


def assert_untouched(victims: dict[Any, bytes]) -> None:
    for victim, data in victims.items():
        assert victim.read_bytes() == data, f"{victim} was written through a planted link"
