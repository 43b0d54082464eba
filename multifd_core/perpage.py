"""The per-page container of QEMU's qpl and uadk methods (one format, two methods).

Payload = ``be32 len[normal]`` then the page blobs in offset order. ``len == PAGE`` means the
blob is the raw page; otherwise it is the page compressed on its own (< PAGE bytes).

The receiver checks the length array before touching any blob (QEMU asserts and aborts
here; we raise ``MethodError``): ``4 x normal < next_packet_size``, every ``1 <= len <=
PAGE``, and ``next_packet_size == 4 x normal + sum(len)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.errors import MethodError
from multifd_core.hookspecs import hookimpl
from multifd_core.method import Method

LENGTH = np.dtype(">u4")


def page_rows(pages: np.ndarray) -> list[memoryview]:
    """One zero-copy view per page of a C-contiguous ``(n, PAGE)`` uint8 array."""
    n, size = pages.shape
    flat = memoryview(np.ascontiguousarray(pages)).cast("B")
    return [flat[o:o + size] for o in range(0, n * size, size)]


def pack(rows: list[memoryview], blobs: list[Any], page_size: int) -> list[Any]:
    """The payload buffers: lengths, then each blob, or the raw page when the blob is
    ``None`` or not smaller than a page."""
    lens = np.fromiter((page_size if b is None else len(b) for b in blobs), dtype=np.int64,
                       count=len(blobs))
    raw = lens >= page_size
    if raw.any():
        for i in np.flatnonzero(raw).tolist():
            blobs[i] = rows[i]
        lens[raw] = page_size
    return [lens.astype(LENGTH).tobytes(), *blobs]


def pack_raw(pages: np.ndarray) -> list[Any]:
    """Every page raw: what QEMU's uadk sender does without hardware."""
    n, size = pages.shape
    return [np.full(n, size, dtype=LENGTH).tobytes(), memoryview(np.ascontiguousarray(pages))]


def lengths(payload: memoryview, normal: int, page_size: int, channel: int, method: str
            ) -> tuple[list[int], list[int]]:
    """Validate the length array; return the blob lengths and their payload offsets."""
    size = len(payload)
    head = 4 * normal
    if head >= size:
        raise MethodError(
            f"multifd {channel}: {method} payload of {size} bytes cannot hold the length "
            f"array of {normal} pages plus data", field="next_packet_size", received=size,
            expected=f"> {head}", channel=channel)
    lens = np.frombuffer(payload[:head], dtype=LENGTH).astype(np.int64)
    bad = np.flatnonzero((lens > page_size) | (lens == 0))
    if len(bad):
        i = int(bad[0])
        raise MethodError(
            f"multifd {channel}: {method} page {i} has blob length {int(lens[i])}",
            field=f"len[{i}]", received=int(lens[i]), expected=f"1..{page_size}",
            channel=channel)
    total = head + int(lens.sum())
    if total != size:
        raise MethodError(
            f"multifd {channel}: {method} lengths add up to {total} bytes, the packet says "
            f"{size}", field="next_packet_size", received=size, expected=total,
            channel=channel)
    offsets = (head + np.concatenate(([0], np.cumsum(lens[:-1])))).tolist()
    return lens.tolist(), offsets


def unpack_into(payload: memoryview, normal: int, page_size: int, out: memoryview,
                decode: Callable[[memoryview, memoryview], None], channel: int,
                method: str) -> None:
    """Validate, then fill ``out`` (exactly ``normal x PAGE`` bytes): raw pages are copied,
    the others go through ``decode(blob, page_out)``, which must fill ``page_out`` exactly."""
    lens, offsets = lengths(payload, normal, page_size, channel, method)
    for i, (off, n) in enumerate(zip(offsets, lens, strict=True)):
        dst = out[i * page_size:(i + 1) * page_size]
        if n == page_size:
            dst[:] = payload[off:off + n]
        else:
            decode(payload[off:off + n], dst)


class PerPageMethod(Method):
    """The hooks of a method that uses this container (QEMU's qpl and uadk).

    A subclass defines ``open_channel(channel, sending)``, which puts in ``channel.state`` an
    engine with ``compress(rows) -> payload buffers``, ``decompress_into(payload, normal, out)``
    and ``close()``; everything else is here."""

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * (4 + self.page_size)

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        self.open_channel(channel, sending=True)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(page_rows(packet.pages()))

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        self.open_channel(channel, sending=False)

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        out = channel.buffer(packet.expected_size)
        channel.state.decompress_into(packet.read_payload(), packet.normal_pages, out)
        packet.write_pages(out)

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()
