"""QEMU's multifd channel format as a sans-IO layer: constants, encode, decode and validate.

No sockets and no threads here. Layouts follow QEMU 10.0 (``migration/multifd.h``): every
integer is big-endian, structures are packed, and a RAM packet is always sent at full length
(320 bytes + 8 bytes per page slot). Validation messages keep QEMU's texts and add the field,
the received and the expected value.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from multifd_core.errors import WireError

MAGIC = 0x11223344
VERSION = 1
PACKET_SIZE = 512 * 1024

FLAG_SYNC = 0x01
COMPRESSION_MASK = 0x3E
FLAG_DEVICE_STATE = 0x40
KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK | FLAG_DEVICE_STATE

#: Flag codes QEMU assigns, reserved for these method names.
RESERVED_CODES: dict[str, int] = {
    "none": 0x00,
    "zlib": 0x02,
    "zstd": 0x04,
    "qpl": 0x08,
    "uadk": 0x10,
    "qatzip": 0x20,
}
#: Single bits of the 5-bit compression field; a method's code is 0 or one of these.
COMPRESSION_BITS = (0x02, 0x04, 0x08, 0x10, 0x20)

RAMBLOCK_NAME_LEN = 256
INIT = struct.Struct(">II16sB7x32x")  # 64 bytes
HEADER = struct.Struct(">III")  # magic, version, flags
RAM_FIXED = struct.Struct(">6IQ2I24x256s")  # 320 bytes
DEVICE_STATE = struct.Struct(">III256sII")  # 276 bytes
INIT_LEN = INIT.size
HEADER_LEN = HEADER.size
RAM_FIXED_LEN = RAM_FIXED.size
DEVICE_STATE_LEN = DEVICE_STATE.size

_OFFSETS_BE = np.dtype(">u8")


def check_page_size(page_size: int) -> int:
    """Return ``page_size`` if it is a power of two that divides the 512 KiB packet."""
    if page_size < 512 or page_size > PACKET_SIZE or page_size & (page_size - 1):
        raise WireError(
            "page size must be a power of two between 512 and 524288",
            field="page_size",
            received=page_size,
            expected="a power of two in [512, 524288]",
        )
    return page_size


def page_count(page_size: int) -> int:
    """Pages per packet (PAGE_COUNT): 128 for 4 KiB pages."""
    return PACKET_SIZE // check_page_size(page_size)


def ram_packet_len(page_size: int) -> int:
    """Length of a RAM packet on the wire, whatever its counts: 1344 for 4 KiB pages."""
    return RAM_FIXED_LEN + 8 * page_count(page_size)


def method_bits(flags: int) -> int:
    """The compression field of ``flags``."""
    return flags & COMPRESSION_MASK


# --------------------------------------------------------------------------- init packet


@dataclass(frozen=True)
class InitPacket:
    """``MultiFDInit_t``: the first 64 bytes on every multifd channel."""

    uuid: bytes
    channel_id: int
    magic: int = MAGIC
    version: int = VERSION


def encode_init(uuid: bytes, channel_id: int) -> bytes:
    if len(uuid) != 16:
        raise WireError("uuid must be 16 bytes", field="uuid", received=len(uuid), expected=16)
    if not 0 <= channel_id <= 255:
        raise WireError("channel id out of range", field="id", received=channel_id,
                        expected="0..255")
    return INIT.pack(MAGIC, VERSION, uuid, channel_id)


def decode_init(buf: bytes | memoryview) -> InitPacket:
    if len(buf) != INIT_LEN:
        raise WireError("short channel init packet", field="length", received=len(buf),
                        expected=INIT_LEN)
    magic, version, uuid, channel_id = INIT.unpack(buf)
    return InitPacket(uuid=bytes(uuid), channel_id=channel_id, magic=magic, version=version)


def validate_init(
    init: InitPacket, *, uuid: bytes, channels: int, seen: set[int] | frozenset[int] = frozenset()
) -> None:
    """The destination's checks, in QEMU's order: magic, version, uuid, id, duplicate id.

    Unlike QEMU (which rejects only ``id > channels``), an id equal to the channel count is
    refused too: QEMU's check is off by one.
    """
    if init.magic != MAGIC:
        raise WireError(f"multifd: received packet magic {init.magic:x} expected {MAGIC:x}",
                        field="magic", received=hex(init.magic), expected=hex(MAGIC))
    if init.version != VERSION:
        raise WireError(f"multifd: received packet version {init.version} expected {VERSION}",
                        field="version", received=init.version, expected=VERSION)
    if init.uuid != uuid:
        raise WireError(
            f"multifd: received uuid '{format_uuid(init.uuid)}' and expected uuid "
            f"'{format_uuid(uuid)}' for channel {init.channel_id}",
            field="uuid", received=format_uuid(init.uuid), expected=format_uuid(uuid))
    if init.channel_id >= channels:
        raise WireError(
            f"multifd: received channel id {init.channel_id} is greater than number of "
            f"channels {channels}",
            field="id", received=init.channel_id, expected=f"0..{channels - 1}")
    if init.channel_id in seen:
        raise WireError(f"multifd: received id '{init.channel_id}' already setup",
                        field="id", received=init.channel_id, expected="an id not yet set up")


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --------------------------------------------------------------------------- packet header


def decode_header(buf: bytes | memoryview) -> int:
    """Check the 12-byte header's magic and version; return its flags."""
    magic, version, flags = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise WireError(f"multifd: received packet magic {magic:x}, expected {MAGIC:x}",
                        field="magic", received=hex(magic), expected=hex(MAGIC))
    if version != VERSION:
        raise WireError(f"multifd: received packet version {version}, expected {VERSION}",
                        field="version", received=version, expected=VERSION)
    return flags


# --------------------------------------------------------------------------- RAM packet


@dataclass
class RamPacket:
    """``MultiFDPacket_t`` decoded. ``offsets`` holds normal then zero offsets (uint64)."""

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: bytes
    offsets: np.ndarray = field(repr=False)

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def name(self) -> bytes:
        """The ramblock name: the field's bytes up to its NUL."""
        return block_name(self.ramblock)

    @property
    def block_name(self) -> str:
        return self.name.decode("utf-8", "replace")

    @property
    def normal_offsets(self) -> np.ndarray:
        return self.offsets[: self.normal_pages]

    @property
    def zero_offsets(self) -> np.ndarray:
        return self.offsets[self.normal_pages : self.normal_pages + self.zero_pages]


def _block_name_bytes(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if len(raw) > RAMBLOCK_NAME_LEN - 1 or b"\0" in raw:
        raise WireError("ramblock name must be at most 255 bytes with no NUL",
                        field="ramblock", received=len(raw), expected="<= 255 bytes")
    return raw


def encode_ram_packet_into(
    buf: bytearray | memoryview,
    *,
    page_size: int,
    flags: int,
    packet_num: int,
    ramblock: str | bytes,
    normal: np.ndarray,
    zero: np.ndarray,
    next_packet_size: int,
) -> None:
    """Write a full-length data packet into ``buf`` (``ram_packet_len`` bytes, reused)."""
    count = page_count(page_size)
    n_normal, n_zero = len(normal), len(zero)
    if n_normal + n_zero > count:
        raise WireError("too many pages for one packet", field="pages",
                        received=n_normal + n_zero, expected=f"<= {count}")
    RAM_FIXED.pack_into(buf, 0, MAGIC, VERSION, flags, count, n_normal, next_packet_size,
                        packet_num, n_zero, 0, _block_name_bytes(ramblock))
    slots = np.frombuffer(buf, dtype=_OFFSETS_BE, count=count, offset=RAM_FIXED_LEN)
    slots[:n_normal] = normal
    slots[n_normal : n_normal + n_zero] = zero
    slots[n_normal + n_zero :] = 0


def encode_ram_packet(
    *,
    page_size: int,
    flags: int,
    packet_num: int,
    ramblock: str | bytes,
    normal: np.ndarray | list[int],
    zero: np.ndarray | list[int] = (),
    next_packet_size: int,
) -> bytearray:
    buf = bytearray(ram_packet_len(page_size))
    encode_ram_packet_into(
        buf, page_size=page_size, flags=flags, packet_num=packet_num, ramblock=ramblock,
        normal=np.asarray(normal, dtype=np.uint64), zero=np.asarray(zero, dtype=np.uint64),
        next_packet_size=next_packet_size)
    return buf


def encode_sync_packet(packet_num: int, page_size: int) -> bytearray:
    """A SYNC packet: full length, flags 0x01, every other field zero."""
    buf = bytearray(ram_packet_len(page_size))
    RAM_FIXED.pack_into(buf, 0, MAGIC, VERSION, FLAG_SYNC, 0, 0, 0, packet_num, 0, 0, b"")
    return buf


def decode_ram_packet(buf: bytes | bytearray | memoryview, page_size: int) -> RamPacket:
    """Decode a full-length RAM packet (header included). Checks only magic and version."""
    expected = ram_packet_len(page_size)
    if len(buf) != expected:
        raise WireError("RAM packet has the wrong length", field="length", received=len(buf),
                        expected=expected)
    (_, _, flags, pages_alloc, normal, next_size, packet_num, zero, _,
     ramblock) = RAM_FIXED.unpack_from(buf)
    decode_header(buf)
    # Only the slots the counts use are decoded; counts beyond the packet fail validation.
    used = min(normal + zero, page_count(page_size))
    offsets = np.frombuffer(buf, dtype=_OFFSETS_BE, count=used,
                            offset=RAM_FIXED_LEN).astype(np.uint64)
    return RamPacket(flags=flags, pages_alloc=pages_alloc, normal_pages=normal,
                     next_packet_size=next_size, packet_num=packet_num, zero_pages=zero,
                     ramblock=bytes(ramblock), offsets=offsets)


def validate_ram_packet(
    pkt: RamPacket,
    *,
    page_size: int,
    block_lengths: Mapping[bytes, int],
    method_code: int,
    max_payload: Callable[[int], int],
) -> None:
    """The receiver's checks on a RAM packet, in QEMU's order, plus the ones QEMU lacks.

    ``block_lengths`` maps each block's name to its used length (a snapshot: nothing here
    waits); a name not in it is an unknown block.
    ``max_payload(normal_pages)`` bounds next_packet_size for the negotiated method.
    """
    count = page_count(page_size)
    if pkt.flags & ~KNOWN_FLAGS:
        raise WireError(f"multifd: received packet with unknown flags {pkt.flags:x}",
                        field="flags", received=hex(pkt.flags), expected=f"within {KNOWN_FLAGS:#x}")
    if pkt.pages_alloc > count:
        raise WireError(f"multifd: received packet with {pkt.pages_alloc} pages, expected {count}",
                        field="pages_alloc", received=pkt.pages_alloc, expected=f"<= {count}")
    if pkt.normal_pages > pkt.pages_alloc:
        raise WireError(
            f"multifd: received packet with {pkt.normal_pages} non-zero pages, which exceeds "
            f"maximum expected pages {pkt.pages_alloc}",
            field="normal_pages", received=pkt.normal_pages, expected=f"<= {pkt.pages_alloc}")
    room = pkt.pages_alloc - pkt.normal_pages
    if pkt.zero_pages > room:
        raise WireError(
            f"multifd: received packet with {pkt.zero_pages} zero pages, expected maximum {room}",
            field="zero_pages", received=pkt.zero_pages, expected=f"<= {room}")
    if pkt.normal_pages == 0 and pkt.zero_pages == 0:
        if pkt.next_packet_size:
            raise WireError("multifd: packet without pages carries a payload",
                            field="next_packet_size", received=pkt.next_packet_size, expected=0)
        return
    name = pkt.name
    length = block_lengths.get(name)
    if length is None:
        shown = name.decode("utf-8", "replace")
        raise WireError(f"multifd: unknown ram block {shown}", field="ramblock",
                        received=shown, expected="a ramblock of this session")
    used = pkt.offsets[: pkt.normal_pages + pkt.zero_pages]
    limit = length - page_size
    if used.size:
        # One pass for both checks: an offset too long, or one with low bits set.
        worst = int(np.bitwise_or.reduce(used & np.uint64(page_size - 1)))
        if worst or int(used.max()) > limit:
            too_long = used > limit
            if too_long.any():
                bad = int(used[too_long][0])
                raise WireError(f"multifd: offset too long {bad} (max {length})",
                                field="offset", received=bad, expected=f"<= {limit}")
            bad = int(used[(used & np.uint64(page_size - 1)) != 0][0])
            raise WireError(f"multifd: offset {bad} is not page aligned", field="offset",
                            received=bad, expected=f"a multiple of {page_size}")
    got = method_bits(pkt.flags)
    if got != method_code:
        raise WireError(f"multifd: flags received {got:x} flags expected {method_code:x}",
                        field="flags", received=hex(got), expected=hex(method_code))
    if pkt.normal_pages == 0 and pkt.next_packet_size:
        raise WireError("multifd: packet without normal pages carries a payload",
                        field="next_packet_size", received=pkt.next_packet_size, expected=0)
    bound = max_payload(pkt.normal_pages)
    if pkt.next_packet_size > bound:
        raise WireError("multifd: received unexpectedly large packet", field="next_packet_size",
                        received=pkt.next_packet_size, expected=f"<= {bound}")


def block_name(raw: bytes) -> bytes:
    """The NUL-terminated name in a 256-byte ramblock field (byte 255 forced to NUL)."""
    raw = raw[:RAMBLOCK_NAME_LEN - 1]
    return raw.split(b"\0", 1)[0]


# --------------------------------------------------------------------------- device state


@dataclass(frozen=True)
class DeviceStatePacket:
    """``MultiFDPacketDeviceState_t`` (10.0+, VFIO): header fields; the payload follows."""

    flags: int
    idstr: bytes
    instance_id: int
    next_packet_size: int

    @property
    def name(self) -> str:
        return block_name(self.idstr).decode("utf-8", "replace")


def encode_device_state(idstr: str | bytes, instance_id: int, payload_len: int,
                        flags: int = FLAG_DEVICE_STATE) -> bytes:
    return DEVICE_STATE.pack(MAGIC, VERSION, flags, _block_name_bytes(idstr), instance_id,
                             payload_len)


def decode_device_state(buf: bytes | memoryview) -> DeviceStatePacket:
    if len(buf) != DEVICE_STATE_LEN:
        raise WireError("device state packet has the wrong length", field="length",
                        received=len(buf), expected=DEVICE_STATE_LEN)
    decode_header(buf)
    _, _, flags, idstr, instance_id, size = DEVICE_STATE.unpack(buf)
    return DeviceStatePacket(flags=flags, idstr=bytes(idstr), instance_id=instance_id,
                             next_packet_size=size)


def validate_device_state(pkt: DeviceStatePacket, *, max_payload: int = 1 << 30) -> None:
    if pkt.flags & FLAG_SYNC:
        raise WireError("multifd: received SYNC device state packet", field="flags",
                        received=hex(pkt.flags), expected="no SYNC bit")
    if pkt.next_packet_size == 0:
        raise WireError("multifd: received empty device state packet", field="next_packet_size",
                        received=0, expected="> 0")
    if pkt.idstr[RAMBLOCK_NAME_LEN - 1] != 0:
        raise WireError("unterminated multifd device state idstr", field="idstr",
                        received="no NUL in 256 bytes", expected="NUL-terminated")
    if pkt.next_packet_size > max_payload:
        raise WireError("multifd: device state packet too large", field="next_packet_size",
                        received=pkt.next_packet_size, expected=f"<= {max_payload}")


_COUNTS = struct.Struct(">IIQI")  # normal_pages, next_packet_size, packet_num, zero_pages @ 16


class RamHeaderWriter:
    """Fills one reused RAM packet buffer for a given block and flags (the sender's hot path).

    Offsets are given as big-endian bytes (8 per page) so a packet costs a few slice copies.
    """

    def __init__(self, page_size: int, flags: int, ramblock: str | bytes) -> None:
        self.page_size = page_size
        self.buf = bytearray(ram_packet_len(page_size))
        self._view = memoryview(self.buf)
        self._zeros = bytes(len(self.buf))
        self._used_end = RAM_FIXED_LEN
        RAM_FIXED.pack_into(self.buf, 0, MAGIC, VERSION, flags, page_count(page_size), 0, 0, 0,
                            0, 0, _block_name_bytes(ramblock))

    def fill(self, normal_be: memoryview | bytes, zero_be: memoryview | bytes,
             next_packet_size: int, packet_num: int) -> bytearray:
        n_normal, n_zero = len(normal_be) // 8, len(zero_be) // 8
        if n_normal + n_zero > page_count(self.page_size):
            raise WireError("too many pages for one packet", field="pages",
                            received=n_normal + n_zero, expected=page_count(self.page_size))
        _COUNTS.pack_into(self.buf, 16, n_normal, next_packet_size, packet_num, n_zero)
        v = self._view
        a = RAM_FIXED_LEN + len(normal_be)
        b = a + len(zero_be)
        v[RAM_FIXED_LEN:a] = normal_be
        v[a:b] = zero_be
        if b < self._used_end:
            v[b : self._used_end] = self._zeros[: self._used_end - b]
        self._used_end = b
        return self.buf

__all__ = [
    "COMPRESSION_BITS",
    "COMPRESSION_MASK",
    "DEVICE_STATE",
    "DEVICE_STATE_LEN",
    "DeviceStatePacket",
    "FLAG_DEVICE_STATE",
    "FLAG_SYNC",
    "HEADER",
    "HEADER_LEN",
    "INIT",
    "INIT_LEN",
    "InitPacket",
    "KNOWN_FLAGS",
    "MAGIC",
    "PACKET_SIZE",
    "RAMBLOCK_NAME_LEN",
    "RAM_FIXED",
    "RAM_FIXED_LEN",
    "RESERVED_CODES",
    "RamHeaderWriter",
    "RamPacket",
    "VERSION",
    "block_name",
    "check_page_size",
    "decode_device_state",
    "decode_header",
    "decode_init",
    "decode_ram_packet",
    "encode_device_state",
    "encode_init",
    "encode_ram_packet",
    "encode_ram_packet_into",
    "encode_sync_packet",
    "format_uuid",
    "method_bits",
    "page_count",
    "ram_packet_len",
    "validate_device_state",
    "validate_init",
    "validate_ram_packet",
]
