"""One channel's packets, sans-IO: the method's hooks between RAM pages and the wire.

``ChannelEncoder`` turns pages of a block into wire packets (a header and the payload
buffers ``send_prepare`` returns, ready for one gather write); ``ChannelDecoder`` checks a
received RAM packet against a snapshot of the destination blocks, applies its zero pages and
has ``recv`` decode its payload, from any ``PayloadSource``, into the pages. The sender and
receiver threads only move bytes between these and their sockets; the harness, the
conformance kit, ``auto``'s measurement and the benchmarks run the same code on buffers.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifd_core.engine.ram import RamBlock
from multifd_core.methods.context import (
    ChannelContext,
    ChannelStats,
    PageTarget,
    PayloadSource,
    RecvPacket,
    SendPacket,
)
from multifd_core.methods.hookspecs import bind
from multifd_core.methods.method import Method
from multifd_core.wire import (
    FLAG_SYNC,
    RamHeaderWriter,
    RamPacket,
    decode_ram_packet,
    encode_sync_packet,
    page_count,
    ram_packet_len,
    validate_ram_packet,
)
from multifd_core.wire.packetizer import plan_batch
from multifd_core.wire.pages import offsets_to_index

# --------------------------------------------------------------------------- send side


@dataclass
class EncodedPacket:
    """One packet for the wire: ``buffers`` (header first) of ``size`` bytes in all. The
    header buffer is reused: write the packet before asking for the next."""

    buffers: list[Any]
    size: int
    normal_pages: int
    zero_pages: int
    payload_bytes: int


class ChannelEncoder:
    """A sending channel's packets: zero-page split, ``send_prepare``, header."""

    def __init__(self, method: Method, channel_id: int, *, detect_zero: bool = True,
                 hooks: Any = None) -> None:
        self.method = method
        self.hooks = hooks if hooks is not None else bind(method)
        self.page_size = method.page_size
        self.per_packet = page_count(self.page_size)
        self.detect_zero = detect_zero
        self.ctx = ChannelContext(channel_id, self.page_size)
        self._writers: dict[str, RamHeaderWriter] = {}
        self._scratch = bytearray(0)

    def setup(self) -> None:
        self.hooks.send_setup(channel=self.ctx)

    def cleanup(self) -> None:
        self.hooks.send_cleanup(channel=self.ctx)

    def scratch(self, n: int) -> memoryview:
        """A reused buffer for a gathered copy of a packet's pages."""
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def payload(self, packet: SendPacket) -> tuple[list[Any], int]:
        """``send_prepare``'s buffers for ``packet`` and their total size."""
        if not packet.normal_pages:
            return [], 0
        runs = packet.iovecs()
        payload = self.hooks.send_prepare(channel=self.ctx, packet=packet)
        size = packet.normal_pages * self.page_size if payload is runs else _nbytes(payload)
        return payload, size

    def packets(self, block: RamBlock, index: np.ndarray,
                numbers: Iterator[int]) -> Iterator[EncodedPacket]:
        """Pages ``index`` (ascending) of ``block`` as packets of up to PAGE_COUNT pages,
        numbered from ``numbers``."""
        ps = self.page_size
        plan = plan_batch(block.array, block.words, index, ps, self.per_packet, self.detect_zero,
                          block.holes)
        writer = self._writers.get(block.name)
        if writer is None:
            writer = self._writers[block.name] = RamHeaderWriter(ps, self.method.code,
                                                                 block.name)
        nb, zb, rb = plan.normal_bounds, plan.zero_bounds, plan.run_bounds
        for p in range(plan.packets):
            n0, n1 = nb[p], nb[p + 1]
            payload: list[Any] = []
            size = 0
            if n1 > n0:
                packet = SendPacket(block.name, ps, block.pages, plan.normal[n0:n1],
                                    plan.runs[rb[p] : rb[p + 1]], self.scratch)
                payload, size = self.payload(packet)
            header = writer.fill(plan.normal_be[8 * n0 : 8 * n1],
                                 plan.zero_be[8 * zb[p] : 8 * zb[p + 1]], size, next(numbers))
            yield EncodedPacket([header, *payload], len(header) + size, n1 - n0,
                                zb[p + 1] - zb[p], size)

    def sync_packet(self, number: int) -> bytearray:
        return encode_sync_packet(number, self.page_size)


def _nbytes(payload: list[Any]) -> int:
    total = 0
    for p in payload:
        total += p.nbytes if isinstance(p, memoryview) else memoryview(p).nbytes
    return total


# --------------------------------------------------------------------------- receive side


@dataclass
class Target:
    """A destination block and which of its pages have been received (shared by all
    channels: each writes only the pages its packets name)."""

    block: RamBlock
    received: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, block: RamBlock) -> Target:
        return cls(block, np.zeros(block.n_pages, dtype=bool))


class BufferSource:
    """A ``PayloadSource`` over bytes in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data).cast("B")

    def read(self, size: int) -> memoryview:
        return self.data[:size]

    def readinto(self, views: list[memoryview], total: int) -> None:
        done = 0
        for v in views:
            n = v.nbytes
            v.cast("B")[:] = self.data[done : done + n]
            done += n


class ChannelDecoder:
    """A receiving channel's packets: checks, zero pages, ``recv``, counts.

    ``fresh``: the destination starts zeroed, so a zero page is written only over a page
    already received (QEMU's rule); otherwise every zero page is written."""

    def __init__(self, method: Method, channel_id: int, *, fresh: bool = True,
                 stats: ChannelStats | None = None, hooks: Any = None) -> None:
        self.method = method
        self.hooks = hooks if hooks is not None else bind(method)
        self.page_size = method.page_size
        self.packet_len = ram_packet_len(self.page_size)
        self.fresh = fresh
        self.ctx = ChannelContext(channel_id, self.page_size)
        self.stats = stats if stats is not None else ChannelStats()
        self.targets: Mapping[bytes, Target] | None = None
        self._lengths: dict[bytes, int] = {}

    def setup(self) -> None:
        self.hooks.recv_setup(channel=self.ctx)

    def cleanup(self) -> None:
        self.hooks.recv_cleanup(channel=self.ctx)

    def use_blocks(self, targets: Mapping[bytes, Target]) -> None:
        """The destination blocks, by name: packets are checked against this snapshot."""
        self.targets = targets
        self._lengths = {name: t.block.used_length for name, t in targets.items()}

    @staticmethod
    def carries_pages(pkt: RamPacket) -> bool:
        return bool(pkt.normal_pages or pkt.zero_pages)

    def packet(self, raw: bytes | memoryview) -> RamPacket:
        """A whole RAM packet (header included), decoded and checked. A packet that carries
        pages needs ``use_blocks`` first."""
        pkt = decode_ram_packet(raw, self.page_size)
        if self.carries_pages(pkt) and self.targets is None:
            raise RuntimeError("ChannelDecoder.use_blocks() before a packet with pages")
        validate_ram_packet(pkt, page_size=self.page_size, block_lengths=self._lengths,
                            method_code=self.method.code, max_payload=self.method.max_payload)
        st = self.stats
        st.wire_bytes += self.packet_len + pkt.next_packet_size
        st.max_packet_num = max(st.max_packet_num, pkt.packet_num)
        return pkt

    def apply(self, pkt: RamPacket, source: PayloadSource) -> None:
        """Write the packet's pages: zero pages, then ``recv`` decodes the payload from
        ``source`` into the block."""
        if not self.carries_pages(pkt):
            if pkt.is_sync:
                self.stats.sync_packets += 1
            return
        assert self.targets is not None
        target = self.targets[pkt.name]
        ps = self.page_size
        if pkt.zero_pages:
            zidx = offsets_to_index(pkt.zero_offsets, ps)
            todo = zidx[target.received[zidx]] if self.fresh else zidx
            if len(todo):
                target.block.pages[todo] = 0
            target.received[zidx] = True
        if pkt.normal_pages:
            # A page named twice in one packet is written twice, inside the block:
            # harmless, so not checked on the hot path.
            nidx = offsets_to_index(pkt.normal_offsets, ps)
            self.decode(pkt, source, target.block, nidx)
            target.received[nidx] = True
        st = self.stats
        st.packets += 1
        st.normal_pages += pkt.normal_pages
        st.zero_pages += pkt.zero_pages
        st.payload_bytes += pkt.next_packet_size
        if pkt.is_sync:
            st.sync_packets += 1

    def decode(self, pkt: RamPacket, source: PayloadSource, target: PageTarget,
               index: np.ndarray) -> None:
        """``recv`` on the packet's payload, into pages ``index`` of ``target``."""
        packet = RecvPacket(channel_id=self.ctx.id, packet_num=pkt.packet_num,
                            flags=pkt.flags & ~FLAG_SYNC, normal_pages=len(index),
                            next_packet_size=pkt.next_packet_size, page_size=self.page_size,
                            source=source, target=target, index=index)
        try:
            self.hooks.recv(channel=self.ctx, packet=packet)
        except OSError as exc:
            if exc.errno == errno.EFAULT and isinstance(target, RamBlock):
                # A store into a page of a sparse file the disk cannot hold.
                raise target.write_error(exc) from None
            raise
        packet.check_consumed(self.method.name)
