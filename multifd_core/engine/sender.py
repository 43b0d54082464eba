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

from multifd_core.engine.cputime import charge, thread_cpu
from multifd_core.engine.pipeline import ChannelEncoder
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.sockio import sendmsg_all, set_timeout
from multifd_core.errors import MultiFDError, TransportError
from multifd_core.methods.context import ChannelStats
from multifd_core.methods.hookspecs import bind
from multifd_core.methods.method import Method
from multifd_core.wire import (
    FLAG_SYNC,
    encode_init,
    page_count,
)

_POLL = 0.2
#: Packets per channel job: the batch a channel plans at once.
BATCH_PACKETS = 16


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
    """One channel's thread: takes jobs, writes what its ``ChannelEncoder`` makes of them."""

    def __init__(self, sender: Sender, channel_id: int, sock: socket.socket) -> None:
        super().__init__(name=f"multifd-send-{channel_id}", daemon=True)
        self.sender = sender
        self.sock = sock
        self.id = channel_id
        self.encoder = ChannelEncoder(sender.method, channel_id, hooks=sender.hooks,
                                      detect_zero=sender.detect_zero)
        self.stats = ChannelStats()

    def run(self) -> None:
        s = self.sender
        setup = False
        started = thread_cpu()
        try:
            self.encoder.setup()
            setup = True
            if s.send_init:
                self._write([encode_init(s.uuid, self.id)])
            while True:
                job = s.jobs.get()
                kind = job[0]
                if kind == "data":
                    self._send_data(job[1], job[2])
                elif kind == "sync":
                    # One SYNC item per channel: after taking one, a channel waits at the
                    # barrier until every channel has taken its own.
                    if job[1]:
                        self._write([self.encoder.sync_packet(next(s.packet_num))])
                        self.stats.sync_packets += 1
                    s.acks.release()
                    job[2].wait()
                else:
                    return
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # reported to the migration thread
            s.fail(exc, self.id)
        finally:
            charge(self.stats, started)
            if setup:
                try:
                    self.encoder.cleanup()
                except Exception as exc:
                    s.fail(exc, self.id)

    def _write(self, buffers: Sequence[Any], total: int | None = None) -> None:
        try:
            self.stats.wire_bytes += sendmsg_all(self.sock, buffers, total)
        except TimeoutError:
            raise TransportError(f"channel {self.id}: the receiver stopped reading "
                                 f"(no progress for {self.sender.timeout} s)") from None
        except OSError as exc:
            raise TransportError(f"channel {self.id}: send failed: {exc}") from None

    def _send_data(self, block: RamBlock, index: np.ndarray) -> None:
        """Send a batch of pages of one block as packets of up to PAGE_COUNT pages."""
        st = self.stats
        for pkt in self.encoder.packets(block, index, self.sender.packet_num):
            self._write(pkt.buffers, pkt.size)
            st.packets += 1
            st.normal_pages += pkt.normal_pages
            st.zero_pages += pkt.zero_pages
            st.payload_bytes += pkt.payload_bytes


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
        # Packet jobs; an idle channel takes the next one. Bounded, so a slow link holds back
        # the migration thread instead of growing a backlog.
        self.jobs: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=4 * len(sockets))
        self._barrier: threading.Barrier | None = None
        self.acks = threading.Semaphore(0)
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._started = time.perf_counter()
        self._closed = False
        self.channels = [_SendChannel(self, i, sock) for i, sock in enumerate(sockets)]
        for ch in self.channels:
            set_timeout(ch.sock, timeout)
            ch.start()

    # ------------------------------------------------------------------ errors

    def fail(self, exc: BaseException, channel: int) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = exc
        if self._barrier is not None:
            self._barrier.abort()
        for ch in self.channels:
            _shutdown(ch.sock)

    def check(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, MultiFDError):
                raise err
            raise MultiFDError(f"channel failed: {err!r}") from err

    def _progress(self) -> int:
        return sum(c.stats.wire_bytes for c in self.channels)

    def _wait(self, acquire: Callable[[float], Any], what: str) -> Any:
        """Wait for ``acquire``; fail on a channel error, or after ``timeout`` seconds in which
        no channel wrote a byte (a slow link that moves is not a stall)."""
        progress = self._progress()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                return acquire(_POLL)
            except queue.Empty:
                pass
            if deadline is not None:
                now = self._progress()
                if now != progress:
                    progress, deadline = now, time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise TransportError(f"no progress for {self.timeout} s waiting for {what}")

    # ------------------------------------------------------------------ the migration thread

    def queue_pages(self, block: RamBlock, index: np.ndarray | None = None) -> None:
        """Send pages ``index`` (page numbers, ascending) of ``block``; None: every page.

        A whole block is cut into page ranges job by job, so the sender's memory does not
        grow with the size of the block."""
        if block.page_size != self.page_size:
            raise MultiFDError(f"ramblock {block.name} has page size {block.page_size}, "
                               f"the session {self.page_size}")
        if index is not None:
            index = np.asarray(index, dtype=np.int64)
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= block.n_pages):
                raise MultiFDError(f"page index out of range for ramblock {block.name}")
            if len(index) > 1 and not (np.diff(index) > 0).all():  # batches assume it
                raise MultiFDError(f"page numbers for ramblock {block.name} must be ascending "
                                   "and unique")
        total = block.n_pages if index is None else len(index)
        # Jobs of up to BATCH_PACKETS packets, smaller when there are few, so every channel
        # gets work.
        packets = -(-total // self.pages_per_packet)
        per_job = max(1, min(BATCH_PACKETS, packets // (2 * len(self.channels))))
        step = per_job * self.pages_per_packet
        for start in range(0, total, step):
            if index is None:
                pages = np.arange(start, min(start + step, total), dtype=np.int64)
            else:
                pages = index[start : start + step]
            self._put(("data", block, pages))

    def _put(self, job: tuple[Any, ...]) -> None:
        def put(t: float) -> None:
            try:
                self.jobs.put(job, timeout=t)
            except queue.Full:
                raise queue.Empty from None

        self._wait(put, "an idle channel")

    def sync(self, *, local: bool = False) -> None:
        """Every channel finishes its queued packets; with ``local=False`` each then writes one
        SYNC packet (QEMU's MULTIFD_SYNC_ALL). Returns when all channels have done so."""
        barrier = threading.Barrier(len(self.channels))
        self._barrier = barrier
        for _ in self.channels:
            self._put(("sync", not local, barrier))
        for _ in self.channels:
            self._wait(lambda t: self.acks.acquire(timeout=t) or _raise_empty(),
                       "the channels to sync")

    def close(self) -> SendStats:
        """Stop the channel threads, half-close the sockets (EOF at a packet boundary)."""
        if not self._closed:
            self._closed = True
            for _ in self.channels:
                self._put(("stop",))
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
        while True:  # drop queued work so the threads see their stop at once
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        for _ in self.channels:
            try:
                self.jobs.put_nowait(("stop",))
            except queue.Full:
                break
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
