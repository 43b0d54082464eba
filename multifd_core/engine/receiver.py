"""The receiving side of the engine: one thread per channel, QEMU's sync barrier.

Each channel thread reads a packet header, validates it (wire.validate_ram_packet), applies
the zero pages, lets the method decode the payload straight into the destination block and, on
a SYNC packet, reports to the main loop and blocks until ``sync_round()`` releases every
channel. Zero pages are written only over pages already received (fresh memory is zero),
unless ``fresh=False``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np

from multifd_core.engine.cputime import charge, thread_cpu
from multifd_core.engine.pipeline import ChannelDecoder, Target
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.sockio import PeerClosed, recv_into_all, recvmsg_into_all, set_timeout
from multifd_core.errors import MultiFDError, TransportError, WireError
from multifd_core.methods.context import ChannelStats
from multifd_core.methods.hookspecs import bind
from multifd_core.methods.method import Method
from multifd_core.wire import (
    DEVICE_STATE_LEN,
    FLAG_DEVICE_STATE,
    HEADER_LEN,
    INIT_LEN,
    InitPacket,
    decode_device_state,
    decode_header,
    decode_init,
    decode_ram_packet,
    validate_device_state,
    validate_init,
)

log = logging.getLogger("multifd.receiver")
_POLL = 0.2


DeviceStateHandler = Callable[[str, int, memoryview], None]


class Receiver:
    """Receives one session's multifd channels into RAM blocks."""

    def __init__(self, method: Method, *, channels: int, page_size: int = 4096,
                 uuid: bytes = bytes(16), timeout: float | None = 60.0, fresh: bool = True,
                 on_device_state: DeviceStateHandler | None = None) -> None:
        if not 1 <= channels <= 255:
            raise MultiFDError(f"channel count {channels} out of range 1..255")
        self.method = method
        self.hooks = bind(method)
        self.channels = channels
        self.page_size = page_size
        self.uuid = uuid
        self.timeout = timeout
        self.fresh = fresh
        self.on_device_state = on_device_state
        self._targets: dict[bytes, Target] = {}
        self._blocks_ready = threading.Event()
        self._arrived = threading.Semaphore(0)
        self._release = [threading.Semaphore(0) for _ in range(channels)]
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._threads: dict[int, threading.Thread] = {}
        self._socks: dict[int, socket.socket] = {}
        self.stats = [ChannelStats() for _ in range(channels)]
        self._error: BaseException | None = None
        self._finished = False
        self._last_progress = time.monotonic()
        self.rounds = 0
        self._at_sync: set[int] = set()  # channels waiting at the barrier
        self._rounds_closed = False

    # ------------------------------------------------------------------ set-up

    def set_blocks(self, blocks: Iterable[RamBlock]) -> None:
        """Declare the destination blocks; channel threads apply pages only after this."""
        for b in blocks:
            if b.page_size != self.page_size:
                raise MultiFDError(f"ramblock {b.name}: page size {b.page_size}, session "
                                   f"{self.page_size}")
            if not b.writable:
                raise MultiFDError(f"ramblock {b.name} is not writable")
            self._targets[b.name.encode()] = Target.of(b)
        self._blocks_ready.set()

    def read_init(self, sock: socket.socket) -> InitPacket:
        buf = bytearray(INIT_LEN)
        set_timeout(sock, self.timeout)
        try:
            recv_into_all(sock, buf, "the channel init packet")
        except TimeoutError:
            raise TransportError("timed out reading a channel init packet") from None
        return decode_init(buf)

    def accept_channel(self, sock: socket.socket, init: InitPacket | None = None) -> int:
        """Validate a channel's init packet (read here unless given) and start its thread."""
        if init is None:
            init = self.read_init(sock)
        with self._lock:
            validate_init(init, uuid=self.uuid, channels=self.channels, seen=self._seen)
            cid = init.channel_id
            self._seen.add(cid)
            self._socks[cid] = sock
            set_timeout(sock, self.timeout)
            t = threading.Thread(target=self._run, args=(cid, sock),
                                 name=f"multifd-recv-{cid}", daemon=True)
            # Started before it is counted: finish() takes a registered thread that is not
            # alive for one that has ended.
            t.start()
            self._threads[cid] = t
        return cid

    @property
    def connected(self) -> int:
        return len(self._threads)

    # ------------------------------------------------------------------ errors

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        for s in list(self._socks.values()):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for sem in self._release:
            sem.release()
        self._arrived.release()
        self._blocks_ready.set()


    def check(self) -> None:
        err = self._error
        if err is not None:
            if isinstance(err, MultiFDError):
                raise err
            raise MultiFDError(f"channel failed: {err!r}") from err

    @property
    def error(self) -> BaseException | None:
        return self._error

    # ------------------------------------------------------------------ main-loop side

    def sync_round(self, timeout: float | None = None) -> int:
        """QEMU's barrier: wait for one SYNC from every channel, then release them all.

        Returns the largest packet number seen so far."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in range(self.channels):
            while not self._arrived.acquire(timeout=_POLL):
                self.check()
                self._check_ended_without_sync()
                if deadline is not None and time.monotonic() > deadline:
                    missing = self.channels - self.connected
                    raise TransportError(
                        f"timed out after {timeout} s waiting for SYNC on every channel "
                        f"(round {self.rounds + 1}; {missing} channel(s) never connected)")
            self.check()
        self.rounds += 1
        self.touch()
        self._at_sync.clear()  # every channel is released from this round's SYNC
        for sem in self._release:
            sem.release()
        return max(s.max_packet_num for s in self.stats)

    def finish(self, timeout: float | None = None) -> list[ChannelStats]:
        """Wait until every channel has reached EOF; raise the first channel error.

        ``timeout`` (default: the receiver's) counts seconds in which nothing moved on any
        channel, so a long transfer is not a stall; when it passes, a ``TransportError`` says
        what was awaited (channels that never connected, a channel held at a SYNC that no
        round pairs with, channels that neither sent nor ended)."""
        timeout = self.timeout if timeout is None else timeout
        while True:
            self.check()
            self._check_unpaired_sync()
            alive = [cid for cid, t in list(self._threads.items()) if t.is_alive()]
            if self.connected == self.channels and not alive:
                break
            idle = time.monotonic() - self._last_progress
            if timeout is not None and idle > timeout:
                raise TransportError(self._stalled(timeout, alive))
            if alive:
                self._threads[alive[0]].join(0.05)
            else:
                time.sleep(0.05)
        self.check()
        self._finished = True
        return self.stats

    def _stalled(self, timeout: float, alive: list[int]) -> str:
        waited = f"waited {timeout} s with nothing moving"
        if self.connected < self.channels:
            return (f"{waited} for the multifd channels to connect: {self.connected} of "
                    f"{self.channels} connected")
        return (f"{waited} for channel(s) {', '.join(map(str, alive))} to end (no data and no "
                "end of stream)")

    def _check_ended_without_sync(self) -> None:
        """While a round waits for every channel's SYNC: a channel that ended never sends
        its own (one SYNC per channel per round)."""
        for cid, t in list(self._threads.items()):
            if not t.is_alive() and self.stats[cid].sync_packets <= self.rounds \
                    and self._error is None:
                raise WireError(
                    f"the channel ended without its SYNC for round {self.rounds + 1}",
                    field="flags", received="end of stream",
                    expected=f"a SYNC for round {self.rounds + 1}", channel=cid)

    def close_rounds(self) -> None:
        """No round follows (the main channel ended its rounds): a channel that sends, or has
        sent, a SYNC from now on breaks the protocol, and says so at once."""
        self._rounds_closed = True
        self._check_unpaired_sync()

    def _check_unpaired_sync(self) -> None:
        if self._rounds_closed and self._at_sync:
            cid = min(self._at_sync)
            self.fail(WireError(
                "a SYNC after the last round: nothing pairs with it",
                field="flags", received="SYNC", expected=f"no SYNC after round {self.rounds}",
                channel=cid))
            self.check()

    def mark_received(self, block_name: str, index: np.ndarray) -> None:
        """Record pages written outside the channels (QEMU's main-channel page records), so a
        later multifd zero page over them writes zeros as QEMU's destination does."""
        self._targets[block_name.encode()].received[index] = True

    def release_all(self) -> None:
        """Release channels blocked at an unpaired trailing SYNC (QEMU 9.0–9.2 sources)."""
        self._at_sync.clear()
        for sem in self._release:
            sem.release()

    def close(self) -> None:
        for s in self._socks.values():
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads.values():
            t.join(5)

    # ------------------------------------------------------------------ channel threads

    def _run(self, cid: int, sock: socket.socket) -> None:
        decoder = ChannelDecoder(self.method, cid, fresh=self.fresh, stats=self.stats[cid],
                                 hooks=self.hooks)
        setup = False
        started = thread_cpu()
        try:
            decoder.setup()
            setup = True
            self._loop(cid, sock, decoder)
        except BaseException as exc:
            if isinstance(exc, WireError):
                exc.on_channel(cid)
            elif isinstance(exc, TimeoutError):
                exc = TransportError(f"channel {cid}: no data for {self.timeout} s")
            elif isinstance(exc, OSError) and self._error is None:
                exc = TransportError(f"channel {cid}: {exc}")
            elif isinstance(exc, TransportError) and not str(exc).startswith("channel"):
                exc = TransportError(f"channel {cid}: {exc}")
            if self._error is None:
                log.debug("channel %d failed: %s", cid, exc)
            self.fail(exc)
        finally:
            charge(self.stats[cid], started)
            if setup:
                try:
                    decoder.cleanup()
                except Exception as exc:
                    self.fail(exc)

    def _loop(self, cid: int, sock: socket.socket, decoder: ChannelDecoder) -> None:
        """Packets off the socket into the decoder, until EOF at a packet boundary."""
        plen = decoder.packet_len
        view = memoryview(bytearray(plen))
        source = SocketSource(sock)
        st = self.stats[cid]
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            if not self._await_packet(cid, sock, poller):
                return
            try:
                recv_into_all(sock, view[:HEADER_LEN], "a packet header")
            except PeerClosed as exc:
                if exc.at_boundary:
                    return  # normal end
                raise WireError("multifd: unexpected EOF in packet header", field="header",
                                received="EOF", expected=f"{HEADER_LEN} bytes") from None
            if self._error is not None:
                return
            flags = decode_header(view[:HEADER_LEN])
            if flags & FLAG_DEVICE_STATE:
                self._device_state(sock, view, st)
                continue
            try:
                recv_into_all(sock, view[HEADER_LEN:plen], "a packet")
            except PeerClosed:
                raise WireError("multifd: unexpected EOF after packet header", field="packet",
                                received="EOF", expected=f"{plen} bytes") from None
            if decoder.targets is None and ChannelDecoder.carries_pages(
                    decode_ram_packet(view, self.page_size)):
                self._wait_blocks()
                decoder.use_blocks(self._targets)
            pkt = decoder.packet(view)
            decoder.apply(pkt, source)
            self._last_progress = time.monotonic()
            if pkt.is_sync:
                self._at_sync.add(cid)
                self._check_unpaired_sync()
                self._arrived.release()
                while not self._release[cid].acquire(timeout=_POLL):
                    if self._error is not None:
                        return
                if self._error is not None:
                    return

    def _await_packet(self, cid: int, sock: socket.socket, poller: select.poll) -> bool:
        """Wait at a packet boundary until the channel has data (True) or the session ends
        (False). An idle channel is fine while anything else moves (another channel, or the
        main channel through ``touch``); only ``timeout`` seconds of no progress anywhere
        fail it. Inside a packet, the socket's own timeout applies."""
        pending = getattr(sock, "pending", None)
        if pending is not None and pending():
            return True  # TLS: decrypted bytes already buffered
        while not poller.poll(_POLL * 1000):
            if self._error is not None:
                return False
            idle = time.monotonic() - self._last_progress
            if self.timeout is not None and idle > self.timeout:
                raise TransportError(f"channel {cid}: no data for {self.timeout} s (nothing "
                                     "moved on any channel)")
        return self._error is None

    def touch(self) -> None:
        """Record progress made outside the channels (the main channel's reader calls it)."""
        self._last_progress = time.monotonic()

    def _device_state(self, sock: socket.socket, view: memoryview,
                      st: ChannelStats) -> None:
        try:
            recv_into_all(sock, view[HEADER_LEN:DEVICE_STATE_LEN], "a device state packet")
        except PeerClosed:
            raise WireError("multifd: unexpected EOF after packet header", field="packet",
                            received="EOF", expected=f"{DEVICE_STATE_LEN} bytes") from None
        pkt = decode_device_state(view[:DEVICE_STATE_LEN])
        validate_device_state(pkt, max_payload=64 << 20)
        if self.on_device_state is None:
            raise WireError("multifd: unexpected device state packet", field="flags",
                            received=hex(pkt.flags), expected="a RAM packet")
        data = bytearray(pkt.next_packet_size)
        recv_into_all(sock, data, "device state")
        st.wire_bytes += DEVICE_STATE_LEN + len(data)
        self.on_device_state(pkt.name, pkt.instance_id, memoryview(data))

    def _wait_blocks(self) -> None:
        while not self._blocks_ready.wait(_POLL):
            if self._error is not None:
                break
        self.check()


class SocketSource:
    """A ``PayloadSource`` on a channel's socket: ``read`` into a buffer allocated on first
    use (a method that reads the payload straight into the pages never needs one) and grown
    to the largest payload; ``readinto`` scatters straight into the pages."""

    __slots__ = ("sock", "_buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(0)

    def read(self, size: int) -> memoryview:
        if len(self._buf) < size:
            self._buf = bytearray(size)
        view = memoryview(self._buf)[:size]
        try:
            recv_into_all(self.sock, view, "a packet payload")
        except PeerClosed:
            raise WireError("multifd: unexpected EOF in packet payload", field="payload",
                            received="EOF", expected=f"{size} bytes") from None
        return view

    def readinto(self, views: list[memoryview], total: int) -> None:
        try:
            recvmsg_into_all(self.sock, views, total, "a packet payload")
        except PeerClosed:
            raise WireError("multifd: unexpected EOF in packet payload", field="payload",
                            received="EOF", expected=f"{total} bytes") from None
