"""Reference decoders for the differential fuzz targets: what a peer's bytes must decode to.

Written from the specs (/work/shared/spec/multifd-wire.md: §2.2-2.3 init packet, §3 RAM
packet, §5 device state, §7 method payloads; the native session protocol as
multifd_core/protocol.py's docstring and README describe it), not from the project's code:
plain ``struct``, ints and the standard libraries, one rule a line, no numpy, nothing imported
from multifd_core. Slow on purpose. Each function returns the decoded value or raises
``Reject(field)`` naming the first field that breaks a rule, in the order the receiver checks
(QEMU's order, then the checks it lacks, which the project adds and documents).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = 0x11223344
VERSION = 1
PACKET_SIZE = 512 * 1024
FLAG_SYNC = 0x01
FLAG_DEVICE_STATE = 0x40
COMPRESSION_MASK = 0x3E  # 10.0: five single-bit method codes


class Reject(Exception):
    """The reference refuses the input; ``field`` names what was wrong."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def _u32(buf: bytes, at: int) -> int:
    return struct.unpack_from(">I", buf, at)[0]


def _u64(buf: bytes, at: int) -> int:
    return struct.unpack_from(">Q", buf, at)[0]


def _header(buf: bytes) -> int:
    """§3.1: magic, version; returns the flags."""
    if _u32(buf, 0) != MAGIC:
        raise Reject("magic")
    if _u32(buf, 4) != VERSION:
        raise Reject("version")
    return _u32(buf, 8)


# --------------------------------------------------------------------------- init (§2.2-2.3)


def init_packet(buf: bytes, *, uuid: bytes, channels: int, seen: set[int]) -> int:
    """The channel id of a valid 64-byte init packet. The project refuses ``id == channels``
    too (QEMU's check is off by one)."""
    if len(buf) != 64:
        raise Reject("length")
    if _u32(buf, 0) != MAGIC:
        raise Reject("magic")
    if _u32(buf, 4) != VERSION:
        raise Reject("version")
    if buf[8:24] != uuid:
        raise Reject("uuid")
    channel_id = buf[24]
    if channel_id >= channels:
        raise Reject("id")
    if channel_id in seen:
        raise Reject("id")
    return channel_id


# --------------------------------------------------------------------------- RAM packet (§3)


@dataclass(frozen=True)
class RamPacket:
    flags: int
    packet_num: int
    next_packet_size: int
    block: bytes | None  # None for a packet without pages (its name is never looked at)
    normal: tuple[int, ...]  # byte offsets
    zero: tuple[int, ...]


def ram_packet(buf: bytes, *, page_size: int, blocks: dict[bytes, int], method_code: int,
               max_payload: int) -> RamPacket:
    """§3.3 in order. Added by the project (documented in wire.py): flags outside the known
    bits are refused first; offsets must be page aligned; a packet without pages, or without
    normal pages, carries no payload; next_packet_size <= ``max_payload`` (per normal page
    count, given by the caller for this packet)."""
    count = PACKET_SIZE // page_size
    if len(buf) != 320 + 8 * count:
        raise Reject("length")
    flags = _header(buf)
    pages_alloc = _u32(buf, 12)
    normal = _u32(buf, 16)
    next_size = _u32(buf, 20)
    packet_num = _u64(buf, 24)
    zero = _u32(buf, 32)
    if flags & ~(FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE):
        raise Reject("flags")
    if pages_alloc > count:
        raise Reject("pages_alloc")
    if normal > pages_alloc:
        raise Reject("normal_pages")
    if zero > pages_alloc - normal:
        raise Reject("zero_pages")
    if normal == 0 and zero == 0:
        if next_size != 0:
            raise Reject("next_packet_size")
        return RamPacket(flags, packet_num, 0, None, (), ())
    name = buf[64:64 + 255].split(b"\0")[0]  # byte 255 is forced to NUL
    if name not in blocks:
        raise Reject("ramblock")
    length = blocks[name]
    offsets = [_u64(buf, 320 + 8 * i) for i in range(normal + zero)]
    for off in offsets:
        if off > length - page_size:
            raise Reject("offset")
    for off in offsets:
        if off % page_size != 0:
            raise Reject("offset")
    if flags & COMPRESSION_MASK != method_code:
        raise Reject("flags")
    if normal == 0 and next_size != 0:
        raise Reject("next_packet_size")
    if next_size > max_payload:
        raise Reject("next_packet_size")
    return RamPacket(flags, packet_num, next_size, name, tuple(offsets[:normal]),
                     tuple(offsets[normal:]))


# --------------------------------------------------------------------------- device state (§5)


@dataclass(frozen=True)
class DeviceState:
    name: bytes
    instance_id: int
    next_packet_size: int


def device_state(buf: bytes, *, max_payload: int) -> DeviceState:
    """§5: 276 bytes; not SYNC, not empty, idstr NUL-terminated; the project bounds the size.
    (The receiver decodes this layout only when the flags carry DEVICE_STATE.)"""
    if len(buf) != 276:
        raise Reject("length")
    flags = _header(buf)
    idstr = buf[12:268]
    instance_id = _u32(buf, 268)
    size = _u32(buf, 272)
    if flags & FLAG_SYNC:
        raise Reject("flags")
    if size == 0:
        raise Reject("next_packet_size")
    if idstr[255] != 0:
        raise Reject("idstr")
    if size > max_payload:
        raise Reject("next_packet_size")
    return DeviceState(idstr.split(b"\0")[0], instance_id, size)


# --------------------------------------------------------------------------- session protocol

FRAME_MAGIC = b"MFDS"
MESSAGE_TYPES = range(1, 10)  # HELLO .. PROBE_RESULT
MAX_BODY = 1 << 20


def frame(header: bytes) -> tuple[int, int]:
    """``b"MFDS" | be16 version 1 | be16 type | be32 length <= 1 MiB``."""
    magic, version, kind, length = struct.unpack(">4sHHI", header)
    if magic != FRAME_MAGIC:
        raise Reject("magic")
    if version != 1:
        raise Reject("version")
    if kind not in MESSAGE_TYPES:
        raise Reject("type")
    if length > MAX_BODY:
        raise Reject("length")
    return kind, length


def body(raw: bytes) -> dict[str, Any]:
    """A body is one JSON object."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise Reject("body") from None
    if type(value) is not dict:
        raise Reject("body")
    return value


def _int(value: Any) -> bool:
    return type(value) is int  # JSON true/false are not numbers


@dataclass(frozen=True)
class Hello:
    uuid: bytes
    page_size: int
    channels: int
    blocks: tuple[tuple[str, int], ...]
    offers: tuple[tuple[str, int, str], ...]
    method: str | None
    level: int | None


def hello(msg: dict[str, Any], *, max_channels: int, max_total: int) -> Hello:
    """HELLO: uuid (32 lower-case hex digits), page_size (a power of two, 512..512 KiB),
    channels (1..max_channels), blocks (1..4096 objects: a unique name of 1..255 UTF-8 bytes
    without NUL, a length that is a positive multiple of page_size; at most max_total bytes in
    all), offers (objects: a name, cut to 64 characters, an integer code, a version shown as
    text, cut to 32; only the first 64 count), method (null or a name), level (null or an
    integer)."""
    uuid = msg.get("uuid")
    if type(uuid) is not str or len(uuid) != 32 or any(c not in "0123456789abcdef"
                                                        for c in uuid):
        raise Reject("uuid")
    ps = msg.get("page_size")
    if not _int(ps) or ps not in {1 << k for k in range(9, 20)}:
        raise Reject("page_size")
    channels = msg.get("channels")
    if not _int(channels) or not 1 <= channels <= max_channels:
        raise Reject("channels")
    raw_blocks = msg.get("blocks")
    if type(raw_blocks) is not list or not 1 <= len(raw_blocks) <= 4096:
        raise Reject("blocks")
    blocks: list[tuple[str, int]] = []
    for item in raw_blocks:
        if type(item) is not dict:
            raise Reject("blocks")
        name, length = item.get("name"), item.get("length")
        if type(name) is not str:
            raise Reject("blocks.name")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise Reject("blocks.name") from None
        if not 1 <= len(encoded) <= 255 or "\0" in name or name in [n for n, _ in blocks]:
            raise Reject("blocks.name")
        if not _int(length) or length <= 0 or length % ps != 0:
            raise Reject("blocks.length")
        blocks.append((name, length))
    if sum(length for _, length in blocks) > max_total:
        raise Reject("blocks")
    raw_offers = msg.get("offers")
    if type(raw_offers) is not list:
        raise Reject("offers")
    offers: list[tuple[str, int, str]] = []
    for item in raw_offers[:64]:
        if type(item) is not dict:
            raise Reject("offers")
        name, code = item.get("name"), item.get("code")
        if type(name) is not str:
            raise Reject("offers.name")
        if not _int(code):
            raise Reject("offers.code")
        offers.append((name[:64], code, str(item.get("version", ""))[:32]))
    method = msg.get("method")
    if method is not None and type(method) is not str:
        raise Reject("method")
    level = msg.get("level")
    if level is not None and not _int(level):
        raise Reject("level")
    return Hello(bytes.fromhex(uuid), ps, channels, tuple(blocks), tuple(offers), method, level)


def digests(msg: dict[str, Any], names: list[str]) -> dict[str, str]:
    """DONE: ``digests`` maps every block name to 64 lower-case hex digits (sha256)."""
    table = msg.get("digests")
    if type(table) is not dict:
        raise Reject("digests")
    out = {}
    for name in names:
        d = table.get(name)
        if type(d) is not str or len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
            raise Reject("digests")
        out[name] = d
    return out


# --------------------------------------------------------------------------- methods (§7)

MAX_COMPRESSED = 1 << 20  # QEMU's zlib/zstd/qatzip receive buffer


class Channel:
    """One receiving channel of a method: ``packet(payload, normal_pages)`` returns the
    decoded pages (``normal_pages * page_size`` bytes) or raises ``Reject``."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def packet(self, payload: bytes, normal: int) -> bytes:
        raise NotImplementedError


class NoneChannel(Channel):
    """§7.1: the raw pages; next_packet_size must be exactly normal x PAGE."""

    def packet(self, payload: bytes, normal: int) -> bytes:
        if len(payload) != normal * self.page_size:
            raise Reject("next_packet_size")
        return payload


class ZlibChannel(Channel):
    """§7.2: one zlib stream for the channel's life, never finished; a packet's payload
    inflates to exactly its pages."""

    def __init__(self, page_size: int) -> None:
        super().__init__(page_size)
        self.stream = zlib.decompressobj(15)

    def packet(self, payload: bytes, normal: int) -> bytes:
        want = normal * self.page_size
        if len(payload) > MAX_COMPRESSED:
            raise Reject("next_packet_size")
        try:
            out = self.stream.decompress(payload, want + 1)
        except zlib.error:
            raise Reject("inflate") from None
        if self.stream.eof:
            raise Reject("inflate")  # Z_STREAM_END is not Z_OK
        if len(out) != want:
            raise Reject("decoded_size")
        return out


class ZstdChannel(Channel):
    """§7.3: one zstd stream for the channel's life (a new frame may follow a frame's end, as
    the DStream allows); a packet's payload decodes to exactly its pages; windows up to
    32 MiB (QEMU's level 20)."""

    def __init__(self, page_size: int) -> None:
        import zstandard

        super().__init__(page_size)
        self.error = zstandard.ZstdError
        self.stream = zstandard.ZstdDecompressor(max_window_size=1 << 25).decompressobj(
            read_across_frames=True)

    def packet(self, payload: bytes, normal: int) -> bytes:
        if len(payload) > MAX_COMPRESSED:
            raise Reject("next_packet_size")
        try:
            out = self.stream.decompress(payload)
        except self.error:
            raise Reject("decompress") from None
        if len(out) != normal * self.page_size:
            raise Reject("decoded_size")
        return out


class PerPageChannel(Channel):
    """§7.4/7.5: ``be32 len[normal]``, then the blobs; ``len == PAGE`` is a raw page, else a
    compressed page that decodes to exactly PAGE; 4 x normal < size == 4 x normal + sum(len)
    and every len <= PAGE."""

    skip = 0  # bytes before the raw DEFLATE data of a blob

    def packet(self, payload: bytes, normal: int) -> bytes:
        ps = self.page_size
        if len(payload) > normal * (4 + ps):
            raise Reject("next_packet_size")
        if 4 * normal >= len(payload):
            raise Reject("next_packet_size")
        lens = [_u32(payload, 4 * i) for i in range(normal)]
        for n in lens:
            if n > ps:
                raise Reject("len")
        if 4 * normal + sum(lens) != len(payload):
            raise Reject("next_packet_size")
        pages = []
        pos = 4 * normal
        for n in lens:
            blob = payload[pos:pos + n]
            pos += n
            pages.append(blob if n == ps else self.page(blob))
        return b"".join(pages)

    def page(self, blob: bytes) -> bytes:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(blob[self.skip:], self.page_size + 1)
        except zlib.error:
            raise Reject("blob") from None
        if not d.eof or len(out) != self.page_size:
            raise Reject("decompressed_len")
        return out


class QplChannel(PerPageChannel):
    """§7.4: each compressed blob is one complete raw DEFLATE stream."""


class UadkChannel(PerPageChannel):
    """§7.5: each compressed blob is a zlib stream whose first 2 bytes are skipped unread; the
    Adler-32 trailer is optional."""

    skip = 2


class QatzipChannel(Channel):
    """§7.6: the payload (at most 1 MiB) is complete gzip members, back to back, each with
    its CRC-32 and ISIZE; together they decode to exactly the pages."""

    def packet(self, payload: bytes, normal: int) -> bytes:
        if len(payload) > MAX_COMPRESSED:
            raise Reject("next_packet_size")
        want = normal * self.page_size
        out = b""
        rest = payload
        while rest:
            member = zlib.decompressobj(31)  # gzip wrapper: checks CRC-32 and ISIZE
            try:
                out += member.decompress(rest, want + 1 - len(out))
            except zlib.error:
                raise Reject("payload") from None
            if len(out) > want:
                raise Reject("decoded_size")
            if not member.eof:
                raise Reject("payload")  # a member cut short
            rest = member.unused_data
        if len(out) != want:
            raise Reject("decoded_size")
        return out


METHODS: dict[str, type[Channel]] = {
    "none": NoneChannel, "zlib": ZlibChannel, "zstd": ZstdChannel, "qpl": QplChannel,
    "uadk": UadkChannel, "qatzip": QatzipChannel,
}
