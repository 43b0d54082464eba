"""The sending side of the engine: pages -> packets -> idle channel threads -> the wire.

Mirrors QEMU's ``multifd_send`` path: the caller (the migration thread) queues pages per RAM
block; they are cut into packets of up to PAGE_COUNT pages and handed to whichever channel is
idle. Each channel thread splits zero pages off (vectorised), calls the method's
``send_prepare`` and writes header and payload with one gather send. ``sync()`` is
MULTIFD_SYNC_ALL (one SYNC packet per channel, after its data) or, with ``local=True``,
MULTIFD_SYNC_LOCAL (every channel drained, nothing written).
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multifd_core.context import ChannelContext, SendPacket
from multifd_core.errors import MultiFDError, TransportError
from multifd_core.method import Method
from multifd_core.pages import page_runs, zero_mask
from multifd_core.ram import RamBlock
from multifd_core.registry import bind
from multifd_core.sockio import sendmsg_all
from multifd_core.wire import (
    FLAG_SYNC,
    encode_init,
    encode_ram_packet_into,
    encode_sync_packet,
    page_count,
    ram_packet_len,
)

_EMPTY = np.zeros(0, dtype=np.int64)
_POLL = 0.2


@dataclass
class ChannelStats:
    packets: int = 0
    sync_packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0


@dataclass
class SendStats:
    """Totals over all channels of a sender."""

    channels: list[ChannelStats]
    seconds: float = 0.0

    @property
    def normal_pages(self) -> int:
        return sum(c.normal_pages for c in self.channels)

    @property
    def zero_pages(self) -> int:
        return sum(c.zero_pages for c in self.channels)

    @property
    def wire_bytes(self) -> int:
        return sum(c.wire_bytes for c in self.channels)

    @property
    def payload_bytes(self) -> int:
        return sum(c.payload_bytes for c in self.channels)

    @property
    def packets_per_channel(self) -> list[int]:
        return [c.packets + c.sync_packets for c in self.channels]


class _SendChannel(threading.Thread):
    def __init__(self, sender: Sender, channel_id: int, sock: socket.socket) -> None:
        super().__init__(name=f"multifd-send-{channel_id}", daemon=True)
        self.sender = sender
        self.sock = sock
        self.ctx = ChannelContext(channel_id, sender.page_size)
        self.jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.stats = ChannelStats()
        self.header = bytearray(ram_packet_len(sender.page_size))
        self._scratch = bytearray(0)

    def scratch(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def run(self) -> None:
        s = self.sender
        setup = False
        try:
            s.hooks.send_setup(channel=self.ctx)
            setup = True
            if s.send_init:
                self._write([encode_init(s.uuid, self.ctx.id)])
            while True:
                job = self.jobs.get()
                kind = job[0]
                if kind == "data":
                    self._send_data(job[1], job[2])
                    s.idle.put(self)
                elif kind == "sync":
                    if job[1]:
                        pkt = encode_sync_packet(next(s.packet_num), s.page_size)
                        self._write([pkt])
                        self.stats.sync_packets += 1
                    s.acks.release()
                else:
                    return
        except BaseException as exc:  # reported to the migration thread
            s.fail(exc, self.ctx.id)
        finally:
            if setup:
                try:
                    s.hooks.send_cleanup(channel=self.ctx)
                except Exception as exc:
                    s.fail(exc, self.ctx.id)

    def _write(self, buffers: Sequence[Any]) -> None:
        try:
            self.stats.wire_bytes += sendmsg_all(self.sock, buffers)
        except TimeoutError:
            raise TransportError(f"channel {self.ctx.id}: the receiver stopped reading "
                                 f"(no progress for {self.sock.gettimeout()} s)") from None
        except OSError as exc:
            raise TransportError(f"channel {self.ctx.id}: send failed: {exc}") from None

    def _send_data(self, block: RamBlock, index: np.ndarray) -> None:
        s = self.sender
        ps = s.page_size
        n = len(index)
        first = int(index[0])
        contiguous = int(index[-1]) - first + 1 == n
        if s.detect_zero:
            words = block.words[first : first + n] if contiguous else block.words[index]
            zmask = zero_mask(words)
            if zmask.any():
                normal, zero = index[~zmask], index[zmask]
            else:
                normal, zero = index, _EMPTY
        else:
            normal, zero = index, _EMPTY
        payload: list[Any] = []
        if len(normal):
            runs = page_runs(block.array, normal, ps)
            packet = SendPacket(block.name, ps, block.pages, normal, runs, self.scratch)
            payload = s.hooks.send_prepare(channel=self.ctx, packet=packet) or []
        size = sum(memoryview(p).nbytes for p in payload)
        encode_ram_packet_into(
            self.header, page_size=ps, flags=s.method.code, packet_num=next(s.packet_num),
            ramblock=block.name, normal=normal.astype(np.uint64) * np.uint64(ps),
            zero=zero.astype(np.uint64) * np.uint64(ps), next_packet_size=size)
        self._write([self.header, *payload])
        st = self.stats
        st.packets += 1
        st.normal_pages += len(normal)
        st.zero_pages += len(zero)
        st.payload_bytes += size


class Sender:
    """N channel threads over connected sockets, sending pages with one method."""

    def __init__(self, method: Method, sockets: Sequence[socket.socket], *,
                 page_size: int = 4096, uuid: bytes = bytes(16), detect_zero: bool = True,
                 send_init: bool = True, timeout: float | None = 60.0) -> None:
        if not 1 <= len(sockets) <= 255:
            raise MultiFDError(f"channel count {len(sockets)} out of range 1..255")
        self.method = method
        self.hooks = bind(method)
        self.page_size = page_size
        self.pages_per_packet = page_count(page_size)
        self.uuid = uuid
        self.detect_zero = detect_zero
        self.send_init = send_init
        self.timeout = timeout
        self.packet_num = itertools.count(1)
        self.idle: queue.SimpleQueue[_SendChannel] = queue.SimpleQueue()
        self.acks = threading.Semaphore(0)
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._started = time.perf_counter()
        self._closed = False
        self.channels = [_SendChannel(self, i, sock) for i, sock in enumerate(sockets)]
        for ch in self.channels:
            sock = ch.sock
            sock.settimeout(timeout)
            self.idle.put(ch)
            ch.start()

    # ------------------------------------------------------------------ errors

    def fail(self, exc: BaseException, channel: int) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc
        for ch in self.channels:
            _shutdown(ch.sock)

    def check(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, MultiFDError):
                raise err
            raise MultiFDError(f"channel failed: {err!r}") from err

    def _wait(self, acquire: Callable[[float], Any], what: str) -> Any:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                return acquire(_POLL)
            except queue.Empty:
                pass
            if deadline is not None and time.monotonic() > deadline:
                raise TransportError(f"timed out after {self.timeout} s waiting for {what}")

    # ------------------------------------------------------------------ the migration thread

    def queue_pages(self, block: RamBlock, index: np.ndarray | None = None) -> None:
        """Send pages ``index`` (page numbers, ascending) of ``block``."""
        if index is None:
            index = np.arange(block.n_pages, dtype=np.int64)
        else:
            index = np.asarray(index, dtype=np.int64)
        if block.page_size != self.page_size:
            raise MultiFDError(f"ramblock {block.name} has page size {block.page_size}, "
                               f"the session {self.page_size}")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= block.n_pages):
            raise MultiFDError(f"page index out of range for ramblock {block.name}")
        step = self.pages_per_packet
        for start in range(0, len(index), step):
            ch = self._wait(lambda t: self.idle.get(timeout=t), "an idle channel")
            ch.jobs.put(("data", block, index[start : start + step]))

    def sync(self, *, local: bool = False) -> None:
        """Every channel finishes its queued packets; with ``local=False`` each then writes one
        SYNC packet (QEMU's MULTIFD_SYNC_ALL). Returns when all channels have done so."""
        for ch in self.channels:
            ch.jobs.put(("sync", not local))
        for _ in self.channels:
            self._wait(lambda t: self.acks.acquire(timeout=t) or _raise_empty(),
                       "the channels to sync")

    def close(self) -> SendStats:
        """Stop the channel threads, half-close the sockets (EOF at a packet boundary)."""
        if not self._closed:
            self._closed = True
            for ch in self.channels:
                ch.jobs.put(("stop",))
            for ch in self.channels:
                ch.join(self.timeout)
            for ch in self.channels:
                _shutdown(ch.sock, socket.SHUT_WR)
        self.check()
        return self.stats

    def abort(self) -> None:
        """Stop at once (error paths): shut the sockets and end the threads."""
        self.fail(MultiFDError("sender aborted"), -1)
        self._closed = True
        for ch in self.channels:
            ch.jobs.put(("stop",))
        for ch in self.channels:
            ch.join(5)

    @property
    def stats(self) -> SendStats:
        return SendStats([c.stats for c in self.channels], time.perf_counter() - self._started)


def _raise_empty() -> None:
    raise queue.Empty


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


__all__ = ["FLAG_SYNC", "ChannelStats", "SendStats", "Sender"]
