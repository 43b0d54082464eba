"""The receiving end of a native session: one sender's handshake, its channels, the verdict.

Peers are untrusted. Every connection goes through a ``ConnectionGate`` (its own deadline, a
bounded number pending); several may be in their handshake at once, each with one deadline
for all of it; the HELLO is checked with limits (channels, RAM, receive memory, open files)
before anything is allocated; strangers are refused and logged without touching the session;
and the output counts only after ``on_verified`` ran on matching digests.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from multifd_core.engine.ram import RamBlock
from multifd_core.engine.receiver import Receiver
from multifd_core.engine.writeback import Writeback, flush_beside
from multifd_core.errors import (
    IntegrityError,
    MultiFDError,
    NegotiationError,
    TransportError,
    WireError,
)
from multifd_core.methods.context import ChannelStats
from multifd_core.methods.method import Method, MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.session.digests import digests
from multifd_core.session.limits import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_RAM,
    check_receive_memory,
    ensure_open_files,
)
from multifd_core.session.mainchannel import DeadlinePassed, MainChannel, close_gently
from multifd_core.session.negotiate import negotiate_method
from multifd_core.session.report import Phases, describe, log_channels, side_text
from multifd_core.session.stats import SessionStats
from multifd_core.session.transport import ConnectionGate, Refusals, accept_until, endpoints
from multifd_core.wire.connection import (
    Accept,
    Connection,
    Done,
    Probe,
    ProbeEnd,
    ProbeResult,
    Refuse,
    Result,
    Role,
    Round,
)
from multifd_core.wire.packets import INIT_LEN, decode_init
from multifd_core.wire.packets import MAGIC as MULTIFD_MAGIC
from multifd_core.wire.protocol import MAGIC as SESSION_MAGIC
from multifd_core.wire.protocol import Hello

log = logging.getLogger("multifd.session")

#: Allocates a destination block: (name, length, page_size) -> writable RamBlock.
Allocator = Callable[[str, int, int], RamBlock]

#: Default time a new connection has to finish its TLS handshake, opening bytes, link probe
#: and HELLO, all together.
HANDSHAKE_TIMEOUT = 10.0
#: Connections that may be in their handshake at once (each on its own thread).
MAX_HANDSHAKES = 8
_POLL = 0.2


class _Digests(threading.Thread):
    """Waits for every channel to end, then writes the blocks back and hashes them, while
    the main channel still waits for DONE (the sender hashes its side meanwhile)."""

    def __init__(self, receiver: Receiver, blocks: list[RamBlock], started: float,
                 phases: Phases, algorithm: str) -> None:
        super().__init__(name="multifd-digest", daemon=True)
        self.receiver, self.blocks, self.started, self.phases = receiver, blocks, started, phases
        self.algorithm = algorithm
        # The disk writes what has landed while the channels still move the rest.
        self.writeback = Writeback([b.fd for b in blocks if b.file_backed]).start()
        self._out: tuple[list[ChannelStats], float, dict[str, str]] | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            try:
                stats = self.receiver.finish()  # fails after ``timeout`` s with nothing moving
            finally:
                self.writeback.stop()
            transfer = time.perf_counter() - self.started
            self.phases.enter("syncing")
            # Write file-backed blocks to disk while hashing them; a failed flush is reported
            # by the output's commit, which flushes again and names the file.
            ours, _ = flush_beside(self.blocks, lambda: digests(self.blocks, self.algorithm))
            self._out = (stats, transfer, ours)
        except BaseException as exc:
            self._error = exc

    def result(self) -> tuple[list[ChannelStats], float, dict[str, str]]:
        """The channels' stats, the transfer time and the digests; the receiver's own
        deadline (no progress for its timeout) ends the wait, hashing is bounded by size."""
        while self.is_alive():
            self.join(0.2)
            self.receiver.check()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out


class ReceiveSession:
    """Serves one native session on a listener per ``serve()`` call (the listener can serve
    the next session afterwards; sessions never run concurrently on it).

    ``reserve(total)``, if given, is called with the blocks' total length before the first is
    allocated. ``wait_first``: seconds to wait for the sender's main channel (default:
    ``timeout``; ``math.inf``: as long as it takes, as QEMU's ``-incoming``); once it is in,
    ``timeout`` applies. ``on_phase`` hears each phase (waiting, negotiating, transferring,
    syncing, verifying); ``on_receiver(receiver, hello)`` is called once the channels'
    receiver exists.
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
        self.engine = engine
        self.max_memory = max_memory
        self.reserve = reserve
        self.wait_first = timeout if wait_first is None else wait_first
        self.on_phase, self.on_receiver = on_phase, on_receiver
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
        log.info("main channel from %s", endpoints(main.sock).split(" -> ")[-1])
        phases.enter("negotiating")
        acceptor: threading.Thread | None = None
        accepted = False
        try:
            try:
                if isinstance(opening, BaseException):
                    raise opening
                hello = self.hello = opening
                name, method, receiver = self._negotiate(hello)
            except MultiFDError as exc:
                self._refuse(main, exc)
                if isinstance(exc, (WireError, TransportError)):
                    raise
                raise NegotiationError(f"refused the session: {exc}") from None
            receiver_side = describe(method)
            if self.on_receiver is not None:
                self.on_receiver(receiver, hello)
            main.send(Accept(name, method.code, receiver_side))
            accepted = True
            phases.enter("transferring")
            transfer_start = time.perf_counter()
            acceptor = threading.Thread(target=self._accept_channels, args=(receiver,),
                                        name="multifd-accept", daemon=True)
            acceptor.start()
            # Hash as soon as every channel has ended (the sender closes them before it hashes
            # its own side), so both ends hash at the same time.
            early = _Digests(receiver, self.blocks, transfer_start, phases, hello.digest)
            early.start()
            done = self._rounds(main, receiver)
            log.info("sender's engine: %s", side_text(done.engine))
            chan_stats, transfer, ours = early.result()
            log_channels(log, chan_stats)
            phases.enter("verifying")
            bad = [n for n in ours if ours[n] != done.digests[n]]
            if bad:
                raise IntegrityError(f"digest mismatch for ramblock(s) {', '.join(bad)}: "
                                     "received data differs from what the sender had")
            stats = SessionStats.of_channels(
                chan_stats, method=name, channels=hello.channels,
                seconds=time.perf_counter() - started, transfer_seconds=transfer,
                ram_bytes=sum(ln for _, ln in hello.blocks), rounds=receiver.rounds,
                digests=ours, digest_algorithm=hello.digest, page_size=hello.page_size,
                sender=done.engine,
                receiver=receiver_side)
            if self.on_verified is not None:
                try:
                    self.on_verified(stats)
                except OSError as exc:
                    raise MultiFDError(f"cannot write the output: {exc.strerror or exc}"
                                       ) from None
            stats.phases = phases.finish()
            self.stats = stats
            main.send(Result(True))
            return stats
        except BaseException as exc:
            if self._receiver is not None:
                self._receiver.fail(exc)
            if accepted and isinstance(exc, MultiFDError):
                kind = "integrity" if isinstance(exc, IntegrityError) else "error"
                try:
                    main.timeout = 2
                    main.send(Result(False, kind, str(exc)))
                except MultiFDError:
                    pass
            raise
        finally:
            self._stop.set()
            if acceptor is not None:
                acceptor.join(5)
            if self._receiver is not None:
                self._receiver.close()
            main.close_gently()

    # ------------------------------------------------------------------ negotiation

    def _negotiate(self, hello: Hello) -> tuple[str, Method, Receiver]:
        """The method, the destination blocks and the channels' receiver for ``hello``."""
        if self.forced is not None:
            self.registry.get(self.forced)
        name = negotiate_method(hello, self.registry, self.forced)
        log.info("sender offers %s; chose %s: %s", ", ".join(
            f"{o.name} ({o.code:#04x})" for o in hello.offers), name,
            f"required by this receiver (--compression {name})" if self.forced else
            f"required by the sender (--compression {name})" if hello.method else
            "the sender's first offer this receiver can run")
        method = self.method = self._create_method(name, hello)
        log.info("engine: %s", side_text(describe(method)))
        check_receive_memory(method, hello.channels, self.max_memory)
        ensure_open_files(len(hello.blocks) + hello.channels, "the session")
        self.blocks = self._allocate(hello)
        receiver = Receiver(method, channels=hello.channels, page_size=hello.page_size,
                            uuid=hello.uuid, timeout=self.timeout, fresh=self.fresh)
        self._receiver = receiver
        receiver.set_blocks(self.blocks)
        return name, method, receiver

    def _create_method(self, name: str, hello: Hello) -> Method:
        """The negotiated method, at the sender's level (its decoder may size its state by
        it: zstd's window)."""
        levels = self.registry.get(name).cls.levels
        level = hello.level if hello.level is not None or levels is None else levels.default
        return self.registry.create(name, MethodOptions(page_size=hello.page_size,
                                                        engine=self.engine, level=level))

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

    def _refuse(self, main: MainChannel, exc: MultiFDError) -> None:
        """REFUSE with the reason, and the method this receiver requires when it has one."""
        try:
            main.timeout = 2
            main.send(Refuse(str(exc), self.forced if self.hello is not None else None))
        except MultiFDError:
            pass

    # ------------------------------------------------------------------ the session

    def _rounds(self, main: MainChannel, receiver: Receiver) -> Done:
        """ROUND markers (each a sync barrier of the channels) until DONE. The wait counts
        time with no progress on any channel; a failed channel ends it."""
        progress = {"bytes": -1, "deadline": 0.0}

        def idle() -> None:
            receiver.check()
            moved = sum(st.wire_bytes for st in receiver.stats)
            now = time.monotonic()
            if moved != progress["bytes"]:
                progress["bytes"], progress["deadline"] = moved, now + self.timeout
            elif now > progress["deadline"]:
                raise TransportError(f"no session message and no channel progress for "
                                     f"{self.timeout} s")

        while True:
            event = main.receive(on_idle=idle)
            receiver.touch()
            if isinstance(event, Done):
                receiver.close_rounds()
                return event
            assert isinstance(event, Round)
            receiver.sync_round()
            log.info("round %d: every channel synced", event.number)

    # ------------------------------------------------------------------ connections

    def _accept_main(self) -> tuple[MainChannel, Hello | BaseException]:
        """The first connection that ends its pre-session phase (PROBE*, HELLO): with its
        HELLO, or with the protocol error it made. Up to ``MAX_HANDSHAKES`` connections may
        be in that phase at once, each with one deadline (``handshake_timeout``) for all of
        it, so a silent or trickling peer never holds up a real sender; one that misses its
        deadline is refused and logged. Connections that open otherwise are refused too."""
        gate = ConnectionGate(self.listener, len(SESSION_MAGIC), reject=self._reject,
                              tls=self.tls, handshake_timeout=self.handshake_timeout)
        done: queue.SimpleQueue[tuple[MainChannel, Any]] = queue.SimpleQueue()
        pending: list[MainChannel] = []
        deadline = time.monotonic() + self.wait_first
        try:
            while True:
                while not done.empty():
                    main, outcome = done.get()
                    pending.remove(main)
                    if isinstance(outcome, DeadlinePassed):
                        self._reject(main.sock, f"handshake not complete by its deadline: "
                                                f"{outcome}")
                        continue
                    return main, outcome
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
                        conn = Connection(Role.RECEIVER, max_channels=self.max_channels,
                                          max_total=self.max_ram)
                        conn.receive_data(head)
                        main = MainChannel(sock, conn, timeout=self.timeout)
                        pending.append(main)
                        threading.Thread(target=self._handshake,
                                         args=(main, done, gate.wake),
                                         name="multifd-handshake", daemon=True).start()
        finally:
            gate.close()
            for main in pending:  # their threads end with the socket
                self._reject(main.sock, "another sender's session started first")
                try:
                    main.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _handshake(self, main: MainChannel, done: queue.SimpleQueue[tuple[MainChannel, Any]],
                   wake: Callable[[], None]) -> None:
        """The pre-session phase of one connection: answer its link probe (raw PROBE frames
        timed from the first to the last, then PROBE_END), until its HELLO; the outcome goes
        to ``done`` and ``wake`` tells the accepting loop at once."""
        try:
            self._handshake_events(main, done)
        finally:
            wake()

    def _handshake_events(self, main: MainChannel,
                          done: queue.SimpleQueue[tuple[MainChannel, Any]]) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        try:
            total, frames, start, last = 0, 0, 0.0, 0.0
            while True:
                event = main.receive(deadline=deadline)
                now = time.perf_counter()
                if isinstance(event, Hello):
                    done.put((main, event))
                    return
                if isinstance(event, Probe):
                    if frames:
                        total += event.size
                    else:
                        start = now  # the first frame's arrival starts the clock
                    frames += 1
                    last = now
                elif isinstance(event, ProbeEnd):
                    main.send(ProbeResult(max(total, 1), max(last - start, 1e-6)))
        except BaseException as exc:  # reported to _accept_main, which decides
            done.put((main, exc))

    def _accept_channels(self, receiver: Receiver) -> None:
        """Accept until every channel is registered; refuse and log strangers (wrong magic,
        version or uuid, bad or duplicate id, silence) without disturbing the session."""

        def handle(sock: socket.socket, raw: bytes) -> None:
            if receiver.connected >= receiver.channels:
                self._reject(sock, "more connections than channels")
                return
            try:
                init = decode_init(raw)
                if init.magic != MULTIFD_MAGIC:
                    raise WireError("not a multifd channel", field="magic",
                                    received=hex(init.magic), expected=hex(MULTIFD_MAGIC))
                cid = receiver.accept_channel(sock, init)
                log.info("channel %d connected (%s)", cid, endpoints(sock))
            except MultiFDError as exc:
                self._reject(sock, str(exc))

        try:
            gate = ConnectionGate(self.listener, INIT_LEN, reject=self._reject, tls=self.tls,
                                  handshake_timeout=self.handshake_timeout,
                                  max_pending=2 * receiver.channels + 16)
        except OSError as exc:
            receiver.fail(TransportError(f"cannot accept channels: {exc}"))
            return
        try:
            accept_until(gate, handle, lambda: (receiver.connected >= receiver.channels
                                                or self._stop.is_set()
                                                or receiver.error is not None))
        except Exception as exc:  # never leave the main loop waiting on a dead acceptor
            receiver.fail(TransportError(f"accepting channels failed: {exc!r}"))
        finally:
            gate.close()


__all__ = ["DEFAULT_MAX_RAM", "HANDSHAKE_TIMEOUT", "Allocator", "ReceiveSession",
           "close_gently"]
