"""The per-page container of QEMU's qpl and uadk methods (one format, two methods).

Payload = ``be32 len[normal]`` then the page blobs in offset order. ``len == PAGE`` means the
blob is the raw page; otherwise it is the page compressed on its own (< PAGE bytes).

The receiver checks the length array before touching any blob (QEMU asserts and aborts
here; we raise ``MethodError``): ``4 x normal < next_packet_size``, every ``1 <= len <=
PAGE``, and ``next_packet_size == 4 x normal + sum(len)``.

``SoftwareEngine`` runs a method's software codec: a native per-packet codec when the plugin
has one (no Python per page: the whole packet in one call that releases the GIL), else the
per-page Python loop of ``pack`` and ``unpack_into``.

A public, stable API for plugins whose payload is this container (docs/writing-a-plugin.md,
section 10): subclass ``PerPageMethod`` and give it engines (``SoftwareEngine`` or your own).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from multifd_core.errors import MethodError
from multifd_core.methods.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.methods.hookspecs import hookimpl
from multifd_core.methods.method import Method

__all__ = [
    "LENGTH", "PacketCodec", "PageCodec", "PerPageMethod", "SoftwareEngine", "check_lengths",
    "lengths", "pack", "pack_raw", "page_rows", "unpack_into",
]

#: The container's length entries: big-endian 32-bit, one per normal page.
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


def pack_raw(packet: SendPacket) -> list[Any]:
    """Every page raw, straight from the packet's runs: what QEMU's uadk sender does without
    hardware."""
    lens = np.full(packet.normal_pages, packet.page_size, dtype=LENGTH)
    return [lens.tobytes(), *packet.iovecs()]


def check_lengths(payload: memoryview, normal: int, page_size: int, channel: int, method: str
                  ) -> np.ndarray:
    """Validate the length array (vectorised); return the blob lengths (int64)."""
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
    return lens


def lengths(payload: memoryview, normal: int, page_size: int, channel: int, method: str
            ) -> tuple[list[int], list[int]]:
    """Validate the length array; return the blob lengths and their payload offsets."""
    lens = check_lengths(payload, normal, page_size, channel, method)
    offsets = (4 * normal + np.concatenate(([0], np.cumsum(lens[:-1])))).tolist()
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


class PageCodec(Protocol):
    """A method's per-page Python codec (the fallback path of ``SoftwareEngine``)."""

    def compress_pages(self, rows: list[memoryview]) -> list[Any]:
        """One blob per page (``None`` or not smaller than a page: sent raw)."""

    def decode(self, blob: memoryview, dst: memoryview) -> None:
        """Inflate one blob into ``dst``, which it must fill exactly."""

    # The errors ``decode`` raises, which the native path raises too (``Failure.error``):
    def corrupt_error(self, detail: str) -> MethodError:
        """The library refused the blob (``detail``: its message)."""

    def length_error(self, got: int, unfinished: bool) -> MethodError:
        """The blob decoded to ``got`` bytes, not a page (``unfinished``: its stream did not
        end); ``got`` is page size + 1 for more than a page."""


class PacketCodec(Protocol):
    """A native codec of whole packets (``multifd_pagecodec.PacketCodec``)."""

    def compress(self, pages: memoryview, n: int) -> memoryview:
        """The payload of ``n`` contiguous pages (valid until the next call)."""

    def decompress_into(self, payload: memoryview, n: int, out: memoryview) -> Any:
        """Place the pages of a payload with a validated length array; None, or a failure
        with ``page``, ``status`` and ``error(codec)``."""


class SoftwareEngine:
    """A software engine of this container: ``native`` (one call a packet, GIL released) when
    given, else ``codec`` page by page in Python. Both write and accept the same bytes.

    ``method`` names the method in error messages; ``channel`` is the channel id. The engine
    interface a ``PerPageMethod`` expects: ``compress(packet)`` returns the payload buffers,
    ``decompress_into(payload, normal, out)`` validates the length array and fills ``out``
    (``normal`` x page size bytes) or raises ``MethodError``, ``close()`` frees it."""

    name = "software"

    def __init__(self, method: str, page_size: int, channel: int, codec: PageCodec,
                 native: PacketCodec | None) -> None:
        self.method, self.page_size, self.channel = method, page_size, channel
        self.codec, self.native = codec, native

    def compress(self, packet: SendPacket) -> list[Any]:
        """The payload of ``packet``: lengths then blobs (raw pages where they do not shrink)."""
        if self.native is not None:
            return [self.native.compress(packet.data(), packet.normal_pages)]
        rows = page_rows(packet.pages())
        return pack(rows, self.codec.compress_pages(rows), self.page_size)

    def decompress_into(self, payload: memoryview, normal: int, out: memoryview) -> None:
        """Validate ``payload`` and place its ``normal`` pages in ``out``."""
        if self.native is None:
            unpack_into(payload, normal, self.page_size, out, self.codec.decode, self.channel,
                        self.method)
            return
        check_lengths(payload, normal, self.page_size, self.channel, self.method)
        failure = self.native.decompress_into(payload, normal, out)
        if failure is not None:
            raise failure.error(self.codec) or MethodError(
                f"multifd {self.channel}: {self.method} page {failure.page} failed to decode "
                f"(native status {failure.status})", field=f"blob[{failure.page}]",
                received=failure.status, expected=0, channel=self.channel)

    def close(self) -> None:
        """Nothing to free (the native codec's buffers go with it)."""
        return None


class PerPageMethod(Method):
    """The hooks of a method that uses this container (QEMU's qpl and uadk).

    A subclass defines ``open_channel(channel, sending)``, which puts in ``channel.state`` an
    engine with ``compress(packet) -> payload buffers``, ``decompress_into(payload, normal,
    out)`` and ``close()`` (``SoftwareEngine`` or a hardware one); everything else is here."""

    def max_payload(self, normal_pages: int) -> int:
        """A length entry and at most a raw page per page."""
        return normal_pages * (4 + self.page_size)

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        self.open_channel(channel, sending=True)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(packet)

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
