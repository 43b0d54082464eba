"""Native sessions between our own endpoints: the main channel, then N multifd channels.

``send_session`` and ``ReceiveSession`` drive the engine (``Sender``/``Receiver``) and speak
``protocol`` on the main channel. The receiver answers only on the main channel; its output is
complete only after every block's sha256 matched the sender's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifd_core.errors import (
    IntegrityError,
    MultiFDError,
    NegotiationError,
    TransportError,
    WireError,
)
from multifd_core.method import Method, MethodOptions
from multifd_core.protocol import (
    FRAME_LEN,
    Hello,
    Msg,
    Offer,
    choose_method,
    decode_body,
    decode_frame,
    encode,
    parse_digests,
    parse_hello,
)
from multifd_core.ram import RamBlock
from multifd_core.receiver import Receiver
from multifd_core.registry import MethodRegistry, default_registry
from multifd_core.sender import Sender
from multifd_core.sockio import PeerClosed, recv_into_all, sendmsg_all
from multifd_core.transport import Address, accept, connect
from multifd_core.wire import MAGIC as MULTIFD_MAGIC

log = logging.getLogger("multifd.session")

#: A round: page numbers to send per block name (None: every page of the block).
Round = Mapping[str, "np.ndarray | None"]


@dataclass
class SessionStats:
    """What a finished session measured (either end)."""

    method: str
    channels: int
    seconds: float
    transfer_seconds: float
    ram_bytes: int
    wire_bytes: int
    payload_bytes: int
    normal_pages: int
    zero_pages: int
    packets_per_channel: list[int]
    rounds: int
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """RAM bytes per second of transfer."""
        return self.ram_bytes / self.transfer_seconds if self.transfer_seconds else 0.0

    @property
    def ratio(self) -> float:
        """Bytes of pages sent divided by payload bytes on the wire (normal pages only)."""
        return self.normal_pages * 1.0 / self.payload_bytes if self.payload_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        page_bytes = self.ram_bytes
        return {
            "method": self.method, "channels": self.channels,
            "seconds": round(self.seconds, 4), "transfer_seconds": round(self.transfer_seconds, 4),
            "ram_bytes": page_bytes, "wire_bytes": self.wire_bytes,
            "payload_bytes": self.payload_bytes, "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages, "packets_per_channel": self.packets_per_channel,
            "rounds": self.rounds,
            "throughput_bytes_per_s": round(self.throughput),
            "compression_ratio": round(self.compression_ratio, 4),
        }

    page_size: int = 4096

    @property
    def compression_ratio(self) -> float:
        raw = self.normal_pages * self.page_size
        return raw / self.payload_bytes if self.payload_bytes else 0.0


# --------------------------------------------------------------------------- main channel I/O


def _send_msg(sock: socket.socket, kind: Msg, body: dict[str, Any]) -> None:
    try:
        sendmsg_all(sock, [encode(kind, body)])
    except OSError as exc:
        raise TransportError(f"main channel: send failed: {exc}") from None


def _recv_msg(sock: socket.socket, *, first: bytes = b"") -> tuple[Msg, dict[str, Any]]:
    header = bytearray(FRAME_LEN)
    header[: len(first)] = first
    try:
        recv_into_all(sock, memoryview(header)[len(first):], "a session message")
        kind, length = decode_frame(header)
        body = bytearray(length)
        recv_into_all(sock, body, "a session message")
    except PeerClosed as exc:
        raise TransportError(f"main channel closed by the peer ({exc})") from None
    except TimeoutError:
        raise TransportError(f"main channel: no message for {sock.gettimeout()} s") from None
    return kind, decode_body(bytes(body))


def _expect(sock: socket.socket, *kinds: Msg) -> tuple[Msg, dict[str, Any]]:
    kind, body = _recv_msg(sock)
    if kind not in kinds:
        raise WireError("unexpected session message", field="type", received=kind.name,
                        expected=" or ".join(k.name for k in kinds))
    return kind, body


def _digests(blocks: Iterable[RamBlock]) -> dict[str, str]:
    """sha256 of every block, hashed in parallel threads (hashlib releases the GIL)."""
    blocks = list(blocks)
    out: dict[str, str] = {}

    def work(b: RamBlock) -> None:
        out[b.name] = b.sha256()

    threads = [threading.Thread(target=work, args=(b,)) for b in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# --------------------------------------------------------------------------- sender


def send_session(
    blocks: list[RamBlock],
    addr: Address,
    *,
    method: str | None = None,
    channels: int = 2,
    level: int | None = None,
    engine: str | None = None,
    rounds: list[Round] | None = None,
    before_round: Callable[[int], None] | None = None,
    registry: MethodRegistry | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    on_sender: Callable[[Sender], None] | None = None,
) -> SessionStats:
    """Migrate ``blocks`` to the receiver at ``addr``; return when it has verified them."""
    registry = registry or default_registry()
    if not blocks:
        raise MultiFDError("nothing to send: no ramblocks")
    page_size = blocks[0].page_size
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise MultiFDError(f"ramblock names must be unique: {names}")
    if not 1 <= channels <= 255:
        raise MultiFDError(f"--channels {channels} out of range 1..255")
    if method is not None:
        entry = registry.get(method)  # unknown method: error with the install hint
        entry.cls(MethodOptions(page_size=page_size, level=level, engine=engine))  # level
    offers = [Offer(e.name, e.code, e.version) for e in registry.entries()
              if e.cls.available()[0]]
    session_uuid = uuidlib.uuid4().bytes
    started = time.perf_counter()
    main = connect(addr, timeout=connect_timeout)
    main.settimeout(timeout)
    socks: list[socket.socket] = []
    sender: Sender | None = None
    try:
        hello = Hello(session_uuid, page_size, channels, [(b.name, b.used_length) for b in blocks],
                      offers, method, level)
        _send_msg(main, Msg.HELLO, hello.to_body())
        kind, body = _expect(main, Msg.ACCEPT, Msg.REFUSE)
        if kind is Msg.REFUSE:
            raise NegotiationError(f"receiver refused the session: {body.get('reason', '?')}")
        chosen = body.get("method")
        if chosen not in registry or (method is not None and chosen != method):
            raise NegotiationError(f"receiver chose method {chosen!r}, which this sender did "
                                   "not offer")
        instance = registry.create(chosen, MethodOptions(page_size=page_size, level=level,
                                                         engine=engine))
        for _ in range(channels):
            socks.append(connect(addr, timeout=connect_timeout))
        transfer_start = time.perf_counter()
        sender = Sender(instance, socks, page_size=page_size, uuid=session_uuid,
                        timeout=timeout)
        if on_sender is not None:
            on_sender(sender)
        by_name = {b.name: b for b in blocks}
        plan = rounds or [dict.fromkeys(names)]
        for i, rnd in enumerate(plan):
            if before_round is not None:
                before_round(i)
            for name, index in rnd.items():
                if name not in by_name:
                    raise MultiFDError(f"round {i} names unknown ramblock {name}")
                sender.queue_pages(by_name[name], index)
            sender.sync()
            _send_msg(main, Msg.ROUND, {"round": i})
        stats = sender.close()
        transfer = time.perf_counter() - transfer_start
        digests = _digests(blocks)
        _send_msg(main, Msg.DONE, {"digests": digests})
        _, result = _expect(main, Msg.RESULT)
        if not result.get("ok"):
            error = str(result.get("error", "unknown error"))[:500]
            if result.get("kind") == "integrity":
                raise IntegrityError(f"receiver reports: {error}")
            raise MultiFDError(f"receiver reports: {error}")
        return SessionStats(
            method=chosen, channels=channels, seconds=time.perf_counter() - started,
            transfer_seconds=transfer, ram_bytes=sum(b.used_length for b in blocks),
            wire_bytes=stats.wire_bytes, payload_bytes=stats.payload_bytes,
            normal_pages=stats.normal_pages, zero_pages=stats.zero_pages,
            packets_per_channel=stats.packets_per_channel, rounds=len(plan), digests=digests,
            page_size=page_size)
    except BaseException:
        if sender is not None:
            sender.abort()
        raise
    finally:
        for s in [main, *socks]:
            try:
                s.close()
            except OSError:
                pass


# --------------------------------------------------------------------------- receiver

#: Allocates a destination block: (name, length, page_size) -> writable RamBlock.
Allocator = Callable[[str, int, int], RamBlock]


class ReceiveSession:
    """Serves one native session on an accepted listener."""

    def __init__(self, listener: socket.socket, allocate: Allocator, *,
                 method: str | None = None, registry: MethodRegistry | None = None,
                 timeout: float = 60.0, max_channels: int = 255,
                 fresh: bool = True) -> None:
        self.listener = listener
        self.allocate = allocate
        self.forced = method
        self.registry = registry or default_registry()
        self.timeout = timeout
        self.max_channels = max_channels
        self.fresh = fresh
        self.blocks: list[RamBlock] = []
        self.hello: Hello | None = None
        self.method: Method | None = None
        self.rejected: list[str] = []
        self._receiver: Receiver | None = None
        self._stop = threading.Event()

    def serve(self) -> SessionStats:
        started = time.perf_counter()
        main = self._accept_main()
        acceptor: threading.Thread | None = None
        try:
            hello = parse_hello(_expect(main, Msg.HELLO)[1], max_channels=self.max_channels)
            self.hello = hello
            try:
                if self.forced is not None:
                    self.registry.get(self.forced)
                name = choose_method(hello, self.registry, self.forced)
                method = self.registry.create(name, MethodOptions(page_size=hello.page_size))
            except MultiFDError as exc:
                _send_msg(main, Msg.REFUSE, {"reason": str(exc)})
                raise NegotiationError(f"refused the session: {exc}") from None
            self.method = method
            self.blocks = [self.allocate(n, ln, hello.page_size) for n, ln in hello.blocks]
            receiver = Receiver(method, channels=hello.channels, page_size=hello.page_size,
                                uuid=hello.uuid, timeout=self.timeout, fresh=self.fresh)
            self._receiver = receiver
            receiver.set_blocks(self.blocks)
            _send_msg(main, Msg.ACCEPT, {"method": name, "code": method.code})
            transfer_start = time.perf_counter()
            acceptor = threading.Thread(target=self._accept_channels, args=(receiver,),
                                        name="multifd-accept", daemon=True)
            acceptor.start()
            rounds = 0
            while True:
                kind, body = _expect(main, Msg.ROUND, Msg.DONE)
                if kind is Msg.ROUND:
                    if body.get("round") != rounds:
                        raise WireError("round marker out of order", field="round",
                                        received=body.get("round"), expected=rounds)
                    receiver.sync_round()
                    rounds += 1
                    continue
                break
            chan_stats = receiver.finish()
            transfer = time.perf_counter() - transfer_start
            theirs = parse_digests(body, [b.name for b in self.blocks])
            for b in self.blocks:
                b.flush()
            ours = _digests(self.blocks)
            bad = [n for n in ours if ours[n] != theirs[n]]
            if bad:
                msg = (f"digest mismatch for ramblock(s) {', '.join(bad)}: received data "
                       f"differs from what the sender had")
                _send_msg(main, Msg.RESULT, {"ok": False, "kind": "integrity", "error": msg})
                raise IntegrityError(msg)
            stats = SessionStats(
                method=name, channels=hello.channels, seconds=time.perf_counter() - started,
                transfer_seconds=transfer, ram_bytes=sum(ln for _, ln in hello.blocks),
                wire_bytes=sum(s.wire_bytes for s in chan_stats),
                payload_bytes=sum(s.payload_bytes for s in chan_stats),
                normal_pages=sum(s.normal_pages for s in chan_stats),
                zero_pages=sum(s.zero_pages for s in chan_stats),
                packets_per_channel=[s.packets + s.sync_packets for s in chan_stats],
                rounds=rounds, digests=ours, page_size=hello.page_size)
            self.stats = stats
            _send_msg(main, Msg.RESULT, {"ok": True})
            return stats
        except BaseException as exc:
            if self._receiver is not None:
                self._receiver.fail(exc)
            if isinstance(exc, MultiFDError) and not isinstance(exc, NegotiationError):
                try:
                    main.settimeout(2)
                    _send_msg(main, Msg.RESULT, {"ok": False, "error": str(exc)})
                except MultiFDError:
                    pass
            raise
        finally:
            self._stop.set()
            if acceptor is not None:
                acceptor.join(5)
            if self._receiver is not None:
                self._receiver.close()
            try:
                main.close()
            except OSError:
                pass

    def _accept_main(self) -> socket.socket:
        """The first connection that speaks the session protocol; others are refused."""
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(f"no sender connected within {self.timeout} s")
            sock = accept(self.listener, remaining)
            sock.settimeout(self.timeout)
            head = bytearray(4)
            try:
                sock.recv_into(head, 4, socket.MSG_PEEK | socket.MSG_WAITALL)
            except OSError:
                sock.close()
                continue
            if bytes(head) == b"MFDS":
                return sock
            self._reject(sock, f"connection before the session started (first bytes "
                               f"{bytes(head).hex()})")

    def _accept_channels(self, receiver: Receiver) -> None:
        """Accept until every channel is registered; refuse and log strangers."""
        budget = 4 * receiver.channels + 16
        while receiver.connected < receiver.channels and not self._stop.is_set():
            if receiver.error is not None:
                return
            try:
                sock = accept(self.listener, 0.2)
            except TransportError:
                continue
            try:
                init = receiver.read_init(sock)
                if init.magic != MULTIFD_MAGIC:
                    raise WireError("not a multifd channel", field="magic",
                                    received=hex(init.magic), expected=hex(MULTIFD_MAGIC))
                receiver.accept_channel(sock, init)
            except MultiFDError as exc:
                self._reject(sock, str(exc))
                budget -= 1
                if budget <= 0:
                    receiver.fail(TransportError(
                        f"too many refused connections; last: {exc}"))
                    return

    def _reject(self, sock: socket.socket, why: str) -> None:
        log.warning("refused a connection: %s", why)
        self.rejected.append(why)
        try:
            sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- file output

_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| \0'})
PARTIAL = ".partial"


def block_file_name(index: int, name: str) -> str:
    """A file name for a block: its index and a sanitised name (names may hold '/')."""
    base = name.translate(_SAFE).strip("._") or "block"
    return f"{index:03d}-{base[:100]}.ram"


class FileOutput:
    """Writes blocks as sparse files ``NNN-name.ram.partial`` in ``out_dir``; ``commit`` renames
    them and writes ``manifest.json`` only after the session verified."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.files: list[tuple[str, str, int, RamBlock]] = []

    def allocate(self, name: str, length: int, page_size: int) -> RamBlock:
        fname = block_file_name(len(self.files), name)
        path = os.path.join(self.out_dir, fname + PARTIAL)
        try:
            block = RamBlock.create_file(path, name, length, page_size=page_size)
        except OSError as exc:
            raise MultiFDError(f"cannot create {path}: {exc.strerror}") from None
        self.files.append((name, fname, length, block))
        return block

    def commit(self, digests: dict[str, str], extra: dict[str, Any] | None = None) -> str:
        import json

        blocks = []
        for name, fname, length, block in self.files:
            block.flush()
            os.replace(os.path.join(self.out_dir, fname + PARTIAL),
                       os.path.join(self.out_dir, fname))
            blocks.append({"name": name, "length": length, "file": fname,
                           "sha256": digests[name]})
        manifest = {"blocks": blocks, **(extra or {})}
        path = os.path.join(self.out_dir, "manifest.json")
        tmp = path + PARTIAL
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        for *_, block in self.files:
            block.close()
