"""Native sessions between our own endpoints: the main channel, then N multifd channels.

``send_session`` and ``ReceiveSession`` drive the engine (``Sender``/``Receiver``) and speak
``protocol`` on the main channel. The receiver answers only on the main channel; its output is
complete only after every block's sha256 matched the sender's.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import ssl
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
from multifd_core.limits import DEFAULT_MAX_MEMORY, check_receive_memory, ensure_open_files
from multifd_core.method import Method, MethodOptions
from multifd_core.outdir import PARTIAL, FileOutput, block_file_name  # noqa: F401 (re-exported)
from multifd_core.protocol import (
    FRAME_LEN,
    MAX_PROBE_BYTES,
    Hello,
    Msg,
    Offer,
    choose_method,
    decode_body,
    decode_frame,
    encode,
    encode_raw,
    parse_digests,
    parse_hello,
    parse_side,
)
from multifd_core.ram import RamBlock
from multifd_core.receiver import Receiver
from multifd_core.registry import MethodRegistry, default_registry
from multifd_core.report import Phases, describe, log_channels, side_text
from multifd_core.sender import Sender
from multifd_core.sockio import PeerClosed, recv_into_all, sendmsg_all
from multifd_core.transport import Address, ConnectionGate, Refusals, connect
from multifd_core.wire import INIT_LEN, decode_init
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
            "engines": {"sender": self.sender, "receiver": self.receiver},
            "phases": self.phases,
            **({"auto": self.auto} if self.auto is not None else {}),
        }

    page_size: int = 4096
    auto: dict[str, Any] | None = None
    #: Each side's engine description (``report.describe``); None when a peer did not say.
    sender: dict[str, Any] | None = None
    receiver: dict[str, Any] | None = None
    #: Seconds per phase of this end (``report.Phases``).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        raw = self.normal_pages * self.page_size
        return raw / self.payload_bytes if self.payload_bytes else 0.0


# --------------------------------------------------------------------------- main channel I/O


def _send_msg(sock: socket.socket, kind: Msg, body: dict[str, Any]) -> None:
    try:
        sendmsg_all(sock, [encode(kind, body)])
    except TimeoutError:
        raise TransportError(f"main channel: the peer stopped reading (no progress for "
                             f"{sock.gettimeout()} s)") from None
    except OSError as exc:
        raise TransportError(f"main channel: send failed: {exc}") from None


class DeadlinePassed(TransportError):
    """A message did not arrive whole by its deadline (a peer trickling bytes)."""


def _recv_by(sock: socket.socket, buf: memoryview | bytearray, what: str,
             deadline: float | None) -> None:
    """``recv_into_all``, but the whole read must end by ``deadline`` (a peer that trickles
    a byte at a time cannot stretch it)."""
    if deadline is None:
        recv_into_all(sock, buf, what)
        return
    view = memoryview(buf).cast("B")
    got = 0
    before = sock.gettimeout()
    try:
        while got < len(view):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlinePassed(f"{what} not complete by its deadline ({got} of "
                                     f"{len(view)} bytes arrived)")
            sock.settimeout(left)
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                continue
            if n == 0:
                raise PeerClosed(f"connection closed after {got} of {len(view)} bytes of "
                                 f"{what}", at_boundary=got == 0)
            got += n
    finally:
        sock.settimeout(before)


def _recv_msg(sock: socket.socket, *, first: bytes = b"",
              deadline: float | None = None) -> tuple[Msg, dict[str, Any]]:
    """One frame; the body is allocated only after its length passed ``decode_frame``."""
    header = bytearray(FRAME_LEN)
    header[: len(first)] = first
    try:
        _recv_by(sock, memoryview(header)[len(first):], "a session message header", deadline)
        kind, length = decode_frame(header)
        body = bytearray(length)
        _recv_by(sock, body, f"a {kind.name} message", deadline)
        if kind is Msg.PROBE:  # raw filler, counted, never parsed
            return kind, {"bytes": length}
    except PeerClosed as exc:
        raise TransportError(f"main channel closed by the peer ({exc})") from None
    except TimeoutError:
        raise TransportError(f"main channel: no message for {sock.gettimeout()} s") from None
    except DeadlinePassed:
        raise
    except OSError as exc:
        raise TransportError(f"main channel: receive failed: {exc}") from None
    return kind, decode_body(bytes(body))


def _expect(sock: socket.socket, *kinds: Msg, first: bytes = b"",
            deadline: float | None = None) -> tuple[Msg, dict[str, Any]]:
    kind, body = _recv_msg(sock, first=first, deadline=deadline)
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


#: ``method=AUTO``: measure the link, predict each method's time on a sample, offer the best.
AUTO = "auto"
#: How long, and how many bytes at most, the link probe pushes on the main channel.
PROBE_SECONDS = 0.3
PROBE_BYTES = 64 << 20


def probe_link(main: socket.socket, *, seconds: float = PROBE_SECONDS,
               max_bytes: int = PROBE_BYTES) -> float:
    """Bytes per second the receiver measured for raw PROBE frames pushed for ``seconds``."""
    chunk = encode_raw(Msg.PROBE, os.urandom(1 << 20))
    deadline = time.monotonic() + seconds
    sent = 0
    while sent < max_bytes and (sent == 0 or time.monotonic() < deadline):
        sendmsg_all(main, [chunk], len(chunk))
        sent += len(chunk)
    _send_msg(main, Msg.PROBE_END, {})
    _, body = _expect(main, Msg.PROBE_RESULT)
    got, secs = body.get("bytes"), body.get("seconds")
    if not isinstance(got, int) or not isinstance(secs, (int, float)) or got <= 0:
        raise WireError("bad probe result", field="PROBE_RESULT", received=repr(body)[:80],
                        expected="bytes > 0 and seconds")
    return got / max(float(secs), 1e-6)


def _auto_offers(main: socket.socket, blocks: list[RamBlock], registry: MethodRegistry,
                 offers: list[Offer], channels: int) -> tuple[list[Offer], dict[str, Any]]:
    """Measure the link, rank the methods by predicted time, and offer them in that order
    (the receiver takes the first it can decode)."""
    from multifd_core.auto import choose_method

    rate = probe_link(main)
    choice, report = choose_method(blocks, registry, channels, rate)
    # The choice first, then the others by predicted time (the fallback if the receiver
    # lacks the choice), then whatever could not be measured.
    rank = {c["method"]: i for i, c in reversed(list(enumerate(report["candidates"])))}
    rank[choice] = -1
    ordered = sorted(offers, key=lambda o: (o.name not in rank, rank.get(o.name, 0)))
    return ordered, report


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
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> SessionStats:
    """Migrate ``blocks`` to the receiver at ``addr``; return when it has verified them.

    With ``tls`` the main channel and every multifd channel run over TLS (the receiver's
    certificate is checked against ``tls_hostname``, by default the address's host).
    ``on_phase`` hears each phase: connecting, negotiating, transferring, verifying."""
    registry = registry or default_registry()
    if not blocks:
        raise MultiFDError("nothing to send: no ramblocks")
    page_size = blocks[0].page_size
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise MultiFDError(f"ramblock names must be unique: {names}")
    if not 1 <= channels <= 255:
        raise MultiFDError(f"--channels {channels} out of range 1..255")
    auto = method == AUTO
    if auto:
        method = None
        if level is not None or engine is not None:
            raise MultiFDError("--compression auto picks the level and engine itself")
    if method is not None:
        entry = registry.get(method)  # unknown method: error with the install hint
        entry.cls(MethodOptions(page_size=page_size, level=level, engine=engine))  # level
    offers = [Offer(e.name, e.code, e.version) for e in registry.entries()
              if e.cls.available()[0]]
    session_uuid = uuidlib.uuid4().bytes
    started = time.perf_counter()
    phases = Phases(log, on_phase)
    phases.enter("connecting")
    main = connect(addr, timeout=connect_timeout, tls=tls, server_hostname=tls_hostname)
    main.settimeout(timeout)
    log.info("main channel connected to %s%s", addr, " (TLS)" if tls else "")
    socks: list[socket.socket] = []
    sender: Sender | None = None
    auto_report: dict[str, Any] | None = None
    try:
        phases.enter("negotiating")
        if auto:
            offers, auto_report = _auto_offers(main, blocks, registry, offers, channels)
            log.info("auto: link %.0f MB/s; chose %s", auto_report["link_bytes_per_s"] / 1e6,
                     auto_report["choice"])
        log.info("offering %s; %s", ", ".join(f"{o.name} ({o.code:#04x})" for o in offers),
                 f"requiring {method}" if method else "the receiver takes the first it can run")
        hello = Hello(session_uuid, page_size, channels, [(b.name, b.used_length) for b in blocks],
                      offers, method, level)
        _send_msg(main, Msg.HELLO, hello.to_body())
        kind, body = _expect(main, Msg.ACCEPT, Msg.REFUSE)
        if kind is Msg.REFUSE:
            reason = str(body.get("reason", "?"))[:500]
            wanted = body.get("method")
            if isinstance(wanted, str) and registry.excluded_plugin(wanted):
                reason += (f"; here method {wanted[:60]!r} is installed but excluded by "
                           f"MULTIFD_PLUGINS")
            raise NegotiationError(f"receiver refused the session: {reason}")
        chosen = body.get("method")
        if (not isinstance(chosen, str) or chosen not in registry
                or (method is not None and chosen != method)):
            raise NegotiationError(f"receiver chose method {str(chosen)[:60]!r}, which this "
                                   "sender did not offer")
        receiver_side = parse_side(body.get("engine"), "ACCEPT")
        instance = registry.create(chosen, MethodOptions(page_size=page_size, level=level,
                                                         engine=engine))
        sender_side = describe(instance)
        log.info("receiver chose %s; its engine: %s", chosen, side_text(receiver_side))
        log.info("engine: %s", side_text(sender_side))
        for i in range(channels):
            socks.append(connect(addr, timeout=connect_timeout, tls=tls,
                                 server_hostname=tls_hostname))
            log.info("channel %d connected (%s)", i, _ends(socks[-1]))
        phases.enter("transferring")
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
            log.info("round %d: %s queued, SYNC sent", i, ", ".join(
                f"{name} {by_name[name].n_pages if index is None else len(index)} pages"
                for name, index in rnd.items()))
        stats = sender.close()
        transfer = time.perf_counter() - transfer_start
        log_channels(log, stats.channels)
        phases.enter("verifying")
        digests = _digests(blocks)
        _send_msg(main, Msg.DONE, {"digests": digests, "engine": sender_side})
        _, result = _expect(main, Msg.RESULT)
        if result.get("ok") is not True:
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
            page_size=page_size, auto=auto_report, sender=sender_side,
            receiver=receiver_side, phases=phases.finish())
    except BaseException as exc:
        if sender is not None:
            sender.abort()
            if isinstance(exc, TransportError):
                reason = _receiver_reason(main)
                if reason:
                    raise TransportError(f"{exc}; receiver reports: {reason}") from None
        raise
    finally:
        for s in [main, *socks]:
            try:
                s.close()
            except OSError:
                pass


def _ends(sock: socket.socket) -> str:
    """``local -> peer`` addresses of a connected socket, for logs."""
    try:
        return f"{_addr_text(sock.getsockname())} -> {_addr_text(sock.getpeername())}"
    except OSError:
        return "?"


def _addr_text(addr: Any) -> str:
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr) or "unix"


def _close_gently(sock: socket.socket, budget: int = 1 << 16, wait: float = 0.2) -> None:
    """Close after our last message: half-close, then drain a little of what the peer still
    sends (bounded in bytes and time), so the close is a FIN and not a reset that could
    destroy our last message (a REFUSE or RESULT) before the peer read it."""
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


def _receiver_reason(main: socket.socket) -> str | None:
    """The receiver's own account of a failed transfer, if it sent one (RESULT not ok)."""
    try:
        main.settimeout(0.5)
        kind, body = _recv_msg(main)
    except MultiFDError:
        return None
    if kind is Msg.RESULT and body.get("ok") is False:
        return str(body.get("error", "?"))[:300]
    return None


# --------------------------------------------------------------------------- receiver


class _EarlyDigest(threading.Thread):
    """Waits for every channel to end, then flushes and hashes the blocks."""

    def __init__(self, receiver: Receiver, blocks: list[RamBlock], started: float,
                 phases: Phases | None = None) -> None:
        super().__init__(name="multifd-digest", daemon=True)
        self.receiver, self.blocks, self.started = receiver, blocks, started
        self.phases = phases
        self._out: tuple[list[Any], float, dict[str, str]] | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            stats = self.receiver.finish()  # fails after ``timeout`` s with nothing moving
            transfer = time.perf_counter() - self.started
            if self.phases is not None:
                self.phases.enter("syncing")
            # Write file-backed blocks to disk while hashing them (fsync runs without the GIL).
            sync = threading.Thread(target=lambda: [b.flush() for b in self.blocks],
                                    name="multifd-sync", daemon=True)
            sync.start()
            digests = _digests(self.blocks)
            sync.join()
            self._out = (stats, transfer, digests)
        except BaseException as exc:
            self._error = exc

    def result(self) -> tuple[list[Any], float, dict[str, str]]:
        """Wait for the digests; the receiver's own deadline (no progress for its timeout)
        ends the wait, and hashing is bounded by the blocks' size."""
        while self.is_alive():
            self.join(0.2)
            self.receiver.check()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out


#: Allocates a destination block: (name, length, page_size) -> writable RamBlock.
Allocator = Callable[[str, int, int], RamBlock]

#: Default cap on the RAM a sender may declare (the sum of its blocks' lengths): 1 TiB.
DEFAULT_MAX_RAM = 1 << 40
#: Default time a new connection has to finish its TLS handshake, opening bytes, link probe
#: and HELLO, all together.
HANDSHAKE_TIMEOUT = 10.0
#: Connections that may be in their handshake at once (each on its own thread).
MAX_HANDSHAKES = 8
SESSION_MAGIC = b"MFDS"
_POLL = 0.2


class ReceiveSession:
    """Serves one native session on a listener per ``serve()`` call (the listener can serve
    the next session afterwards; sessions never run concurrently on it).

    Hostile peers: every connection goes through a ``ConnectionGate`` (its own short deadline,
    a bounded number pending), strangers are refused and logged without touching the session,
    the HELLO is validated with limits (channels, ``max_ram`` bytes of blocks, ``max_memory``
    bytes of receive buffers and decoder state, open files) before anything is allocated, and
    the output counts only after ``on_verified`` ran on matching digests. ``reserve(total)``,
    if given, is called with the blocks' total length before the first is allocated.

    ``wait_first``: seconds to wait for the sender's main channel (default: ``timeout``;
    ``math.inf``: as long as it takes, as QEMU's ``-incoming``); once it is in, ``timeout``
    applies. ``on_phase`` hears each phase (waiting, negotiating, transferring, syncing,
    verifying); ``on_receiver(receiver, hello)`` is called once the channels' receiver exists.
    """

    def __init__(self, listener: socket.socket, allocate: Allocator, *,
                 method: str | None = None, registry: MethodRegistry | None = None,
                 timeout: float = 60.0, max_channels: int = 255,
                 fresh: bool = True, max_ram: int = DEFAULT_MAX_RAM,
                 tls: ssl.SSLContext | None = None, handshake_timeout: float | None = None,
                 on_verified: Callable[[SessionStats], None] | None = None,
                 engine: str | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
                 reserve: Callable[[int], None] | None = None,
                 wait_first: float | None = None,
                 on_phase: Callable[[str], None] | None = None,
                 on_receiver: Callable[[Receiver, Hello], None] | None = None) -> None:
        self.listener = listener
        self.max_memory = max_memory
        self.reserve = reserve
        self.wait_first = timeout if wait_first is None else wait_first
        self.on_phase, self.on_receiver = on_phase, on_receiver
        self.engine = engine
        self.allocate = allocate
        self.forced = method
        self.registry = registry or default_registry()
        self.timeout = timeout
        self.max_channels = max_channels
        self.fresh = fresh
        self.max_ram = max_ram
        self.tls = tls
        self.handshake_timeout = (min(timeout, HANDSHAKE_TIMEOUT) if handshake_timeout is None
                                  else handshake_timeout)
        self.on_verified = on_verified
        self.blocks: list[RamBlock] = []
        self.hello: Hello | None = None
        self.method: Method | None = None
        self._reject = Refusals(log)
        self.rejected = self._reject.reasons
        self.stats: SessionStats | None = None
        self._receiver: Receiver | None = None
        self._stop = threading.Event()

    def serve(self) -> SessionStats:
        started = time.perf_counter()
        phases = Phases(log, self.on_phase)
        phases.enter("waiting")
        main, opening = self._accept_main()
        main.settimeout(self.timeout)
        log.info("main channel from %s", _ends(main).split(" -> ")[-1])
        phases.enter("negotiating")
        acceptor: threading.Thread | None = None
        accepted = False
        try:
            try:
                if isinstance(opening, BaseException):
                    raise opening
                hello = parse_hello(opening, max_channels=self.max_channels,
                                    max_total=self.max_ram)
                self.hello = hello
                if self.forced is not None:
                    self.registry.get(self.forced)
                name = choose_method(hello, self.registry, self.forced)
                log.info("sender offers %s; chose %s: %s", ", ".join(
                    f"{o.name} ({o.code:#04x})" for o in hello.offers), name,
                    f"required by this receiver (--compression {name})" if self.forced else
                    f"required by the sender (--compression {name})" if hello.method else
                    "the sender's first offer this receiver can run")
                method = self._create_method(name, hello)
                self.method = method
                receiver_side = describe(method)
                log.info("engine: %s", side_text(receiver_side))
                self._check_limits(method, hello)
                self.blocks = self._allocate(hello)
                receiver = Receiver(method, channels=hello.channels, page_size=hello.page_size,
                                    uuid=hello.uuid, timeout=self.timeout, fresh=self.fresh)
                self._receiver = receiver
                receiver.set_blocks(self.blocks)
            except MultiFDError as exc:
                self._refuse(main, exc, self.forced if self.hello is not None else None)
                if isinstance(exc, (WireError, TransportError)):
                    raise
                raise NegotiationError(f"refused the session: {exc}") from None
            if self.on_receiver is not None:
                self.on_receiver(receiver, hello)
            _send_msg(main, Msg.ACCEPT, {"method": name, "code": method.code,
                                         "engine": receiver_side})
            accepted = True
            phases.enter("transferring")
            transfer_start = time.perf_counter()
            acceptor = threading.Thread(target=self._accept_channels, args=(receiver,),
                                        name="multifd-accept", daemon=True)
            acceptor.start()
            # Hash as soon as every channel has ended (the sender closes them before it hashes
            # its own side), so both ends hash at the same time.
            early = _EarlyDigest(receiver, self.blocks, transfer_start, phases)
            early.start()
            rounds = 0
            while True:
                self._wait_main(main, receiver)
                kind, body = _expect(main, Msg.ROUND, Msg.DONE,
                                     deadline=time.monotonic() + self.timeout)
                receiver.touch()
                if kind is Msg.ROUND:
                    if body.get("round") != rounds:
                        raise WireError("round marker out of order", field="round",
                                        received=repr(body.get("round"))[:40], expected=rounds)
                    receiver.sync_round()
                    log.info("round %d: every channel synced", rounds)
                    rounds += 1
                    continue
                break
            receiver.close_rounds()
            theirs = parse_digests(body, [b.name for b in self.blocks])
            sender_side = parse_side(body.get("engine"), "DONE")
            log.info("sender's engine: %s", side_text(sender_side))
            chan_stats, transfer, ours = early.result()
            log_channels(log, chan_stats)
            phases.enter("verifying")
            bad = [n for n in ours if ours[n] != theirs[n]]
            if bad:
                raise IntegrityError(f"digest mismatch for ramblock(s) {', '.join(bad)}: "
                                     "received data differs from what the sender had")
            stats = SessionStats(
                method=name, channels=hello.channels, seconds=time.perf_counter() - started,
                transfer_seconds=transfer, ram_bytes=sum(ln for _, ln in hello.blocks),
                wire_bytes=sum(s.wire_bytes for s in chan_stats),
                payload_bytes=sum(s.payload_bytes for s in chan_stats),
                normal_pages=sum(s.normal_pages for s in chan_stats),
                zero_pages=sum(s.zero_pages for s in chan_stats),
                packets_per_channel=[s.packets + s.sync_packets for s in chan_stats],
                rounds=rounds, digests=ours, page_size=hello.page_size, sender=sender_side,
                receiver=receiver_side)
            if self.on_verified is not None:
                try:
                    self.on_verified(stats)
                except OSError as exc:
                    raise MultiFDError(f"cannot write the output: {exc.strerror or exc}"
                                       ) from None
            stats.phases = phases.finish()
            self.stats = stats
            _send_msg(main, Msg.RESULT, {"ok": True})
            return stats
        except BaseException as exc:
            if self._receiver is not None:
                self._receiver.fail(exc)
            if accepted and isinstance(exc, MultiFDError):
                kind_ = "integrity" if isinstance(exc, IntegrityError) else "error"
                try:
                    main.settimeout(2)
                    _send_msg(main, Msg.RESULT, {"ok": False, "kind": kind_, "error": str(exc)})
                except MultiFDError:
                    pass
            raise
        finally:
            self._stop.set()
            if acceptor is not None:
                acceptor.join(5)
            if self._receiver is not None:
                self._receiver.close()
            _close_gently(main)

    # ------------------------------------------------------------------ internals

    def _create_method(self, name: str, hello: Hello) -> Method:
        """The negotiated method, at the sender's level (its decoder may size its state by
        it: zstd's window)."""
        levels = self.registry.get(name).cls.levels
        level = hello.level if hello.level is not None or levels is None else levels.default
        return self.registry.create(name, MethodOptions(page_size=hello.page_size,
                                                        engine=self.engine, level=level))

    def _check_limits(self, method: Method, hello: Hello) -> None:
        """What the peer's numbers would cost, against what the user allowed: receive memory
        (``max_memory``) and open files (one per block and per channel)."""
        check_receive_memory(method, hello.channels, self.max_memory)
        ensure_open_files(len(hello.blocks) + hello.channels, "the session")

    def _allocate(self, hello: Hello) -> list[RamBlock]:
        """The destination blocks; allocation failures become one clear error."""
        blocks = []
        total = sum(ln for _, ln in hello.blocks)
        if self.reserve is not None:
            self.reserve(total)
        for name, length in hello.blocks:
            try:
                block = self.allocate(name, length, hello.page_size)
            except MemoryError:
                raise MultiFDError(f"cannot allocate ramblock {name} ({length} bytes; "
                                   f"{total} bytes in all)") from None
            except OSError as exc:
                raise MultiFDError(f"cannot allocate ramblock {name} ({length} bytes): "
                                   f"{exc.strerror or exc}") from None
            if (block.name, block.used_length, block.page_size) != (name, length,
                                                                     hello.page_size):
                raise MultiFDError(f"allocator returned {block!r} for ramblock {name} of "
                                   f"{length} bytes, page size {hello.page_size}")
            blocks.append(block)
        return blocks

    def _refuse(self, main: socket.socket, exc: MultiFDError, method: str | None = None) -> None:
        """REFUSE with the reason, and the method this receiver requires when it has one."""
        try:
            main.settimeout(2)
            _send_msg(main, Msg.REFUSE, {"reason": str(exc),
                                         **({"method": method} if method else {})})
        except MultiFDError:
            pass

    def _wait_main(self, main: socket.socket, receiver: Receiver) -> None:
        """Wait for the next main-channel message. The timeout counts time without progress
        on any channel (a long round is not a stall); a failed channel ends the wait."""
        if isinstance(main, ssl.SSLSocket) and main.pending():
            return
        sel = selectors.DefaultSelector()
        sel.register(main, selectors.EVENT_READ)
        try:
            last = -1
            deadline = time.monotonic() + self.timeout
            while not sel.select(_POLL):
                receiver.check()
                progress = sum(st.wire_bytes for st in receiver.stats)
                now = time.monotonic()
                if progress != last:
                    last, deadline = progress, now + self.timeout
                elif now > deadline:
                    raise TransportError(f"no session message and no channel progress for "
                                         f"{self.timeout} s")
        finally:
            sel.close()

    def _hello_after_probe(self, main: socket.socket, first: bytes,
                           deadline: float) -> dict[str, Any]:
        """The HELLO body, after answering the sender's link probe if it sends one: raw
        PROBE frames timed from the first to the last, then PROBE_END (bounded in bytes).
        All of it must arrive by ``deadline``."""
        kind, body = _expect(main, Msg.HELLO, Msg.PROBE, Msg.PROBE_END, first=first,
                             deadline=deadline)
        total, frames, start, last = 0, 0, 0.0, 0.0
        while kind is not Msg.HELLO:
            now = time.perf_counter()
            if kind is Msg.PROBE:
                if frames == 0:
                    start = now  # the first frame's arrival starts the clock; not counted
                else:
                    total += body["bytes"]
                frames += 1
                last = now
                if total > MAX_PROBE_BYTES:
                    raise WireError("link probe too long", field="PROBE", received=total,
                                    expected=f"<= {MAX_PROBE_BYTES} bytes")
            else:
                _send_msg(main, Msg.PROBE_RESULT,
                          {"bytes": max(total, 1), "seconds": max(last - start, 1e-6)})
            kind, body = _expect(main, Msg.HELLO, Msg.PROBE, Msg.PROBE_END, deadline=deadline)
        return body

    def _accept_main(self) -> tuple[socket.socket, dict[str, Any] | BaseException]:
        """The first connection that ends its pre-session phase (PROBE*, HELLO): with a HELLO
        body, or with the protocol error it made. Up to ``MAX_HANDSHAKES`` connections may
        be in that phase at once, each with one deadline (``handshake_timeout``) for all of
        it, so a silent or trickling peer never holds up a real sender; one that misses its
        deadline is refused and logged. Connections that open otherwise are refused too."""
        gate = ConnectionGate(self.listener, len(SESSION_MAGIC), reject=self._reject,
                              tls=self.tls, handshake_timeout=self.handshake_timeout)
        done: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        pending: list[socket.socket] = []
        deadline = time.monotonic() + self.wait_first
        try:
            while True:
                while not done.empty():
                    sock, outcome = done.get()
                    pending.remove(sock)
                    if isinstance(outcome, DeadlinePassed):
                        self._reject(sock, f"handshake: {outcome}")
                        continue
                    return sock, outcome
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not pending:
                    raise TransportError(f"no sender connected within {self.wait_first} s")
                for sock, head in gate.poll(min(max(remaining, 0.01), _POLL)):
                    if head != SESSION_MAGIC:
                        self._reject(sock, f"connection before the session started (first "
                                           f"bytes {head.hex()})")
                    elif len(pending) >= MAX_HANDSHAKES:
                        self._reject(sock, f"more than {MAX_HANDSHAKES} connections in their "
                                           "handshake")
                    else:
                        pending.append(sock)
                        threading.Thread(target=self._handshake, args=(sock, head, done),
                                         name="multifd-handshake", daemon=True).start()
        finally:
            gate.close()
            for sock in pending:  # their threads end with the socket
                self._reject(sock, "another sender's session started first")
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handshake(self, sock: socket.socket, first: bytes,
                   done: queue.SimpleQueue[tuple[socket.socket, Any]]) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        try:
            done.put((sock, self._hello_after_probe(sock, first, deadline)))
        except BaseException as exc:  # reported to _accept_main, which decides
            done.put((sock, exc))

    def _accept_channels(self, receiver: Receiver) -> None:
        """Accept until every channel is registered; refuse and log strangers (wrong magic,
        version or uuid, bad or duplicate id, silence) without disturbing the session."""
        try:
            gate = ConnectionGate(self.listener, INIT_LEN, reject=self._reject, tls=self.tls,
                                  handshake_timeout=self.handshake_timeout,
                                  max_pending=2 * receiver.channels + 16)
        except OSError as exc:
            receiver.fail(TransportError(f"cannot accept channels: {exc}"))
            return
        try:
            while (receiver.connected < receiver.channels and not self._stop.is_set()
                   and receiver.error is None):
                for sock, raw in gate.poll(_POLL):
                    if receiver.connected >= receiver.channels:
                        self._reject(sock, "more connections than channels")
                        continue
                    try:
                        init = decode_init(raw)
                        if init.magic != MULTIFD_MAGIC:
                            raise WireError("not a multifd channel", field="magic",
                                            received=hex(init.magic),
                                            expected=hex(MULTIFD_MAGIC))
                        cid = receiver.accept_channel(sock, init)
                        log.info("channel %d connected (%s)", cid, _ends(sock))
                    except MultiFDError as exc:
                        self._reject(sock, str(exc))
        except Exception as exc:  # never leave the main loop waiting on a dead acceptor
            receiver.fail(TransportError(f"accepting channels failed: {exc!r}"))
        finally:
            gate.close()
