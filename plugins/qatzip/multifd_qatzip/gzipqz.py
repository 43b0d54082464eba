"""The QZ-extended gzip format in pure software (QATzip's ``QZ_DEFLATE_GZIP_EXT``).

A payload is a sequence of gzip members. Each member we write has QATzip's 24-byte header
(``1F 8B 08 04``, MTIME 0, XFL, OS 0xFF, XLEN 12, subfield ``QZ`` of 8 bytes holding the
member's uncompressed and compressed sizes, little-endian), raw DEFLATE, then CRC-32 and
ISIZE. One member per <= 64 KiB chunk, as QATzip writes with a QAT device. Decoding accepts
any sequence of standard gzip members (QZ extra field or not) with output bounded by the
caller's expected size.
"""

from __future__ import annotations

import struct
import zlib

from multifd_core.errors import MethodError

CHUNK = 64 * 1024  # QATzip's default hw_buff_sz
# ID1 ID2 CM FLG, MTIME, XFL, OS, XLEN, 'Q', 'Z', LEN, src_sz, dest_sz
_HEADER = struct.Struct("<4sIBBHBBHII")
_TRAILER = struct.Struct("<II")
HEADER_SIZE = _HEADER.size  # 24
_MAGIC = b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA


def member(chunk: memoryview | bytes, level: int) -> list[bytes]:
    """One QZ-extended gzip member for ``chunk`` (header, deflate, trailer)."""
    body = zlib.compress(chunk, level, -15)
    xfl = 4 if level == 1 else 2 if level == 9 else 0
    header = _HEADER.pack(_MAGIC, 0, xfl, 0xFF, 12, ord("Q"), ord("Z"), 8, len(chunk), len(body))
    return [header, body, _TRAILER.pack(zlib.crc32(chunk), len(chunk) & 0xFFFFFFFF)]


def encode(data: memoryview, level: int) -> list[bytes]:
    """The payload for ``data``: one member per <= 64 KiB chunk."""
    out: list[bytes] = []
    for start in range(0, len(data), CHUNK):
        out.extend(member(data[start:start + CHUNK], level))
    return out


def decode_into(payload: memoryview, out: memoryview, channel: int) -> int:
    """Decode the gzip members of ``payload`` into ``out``; return the bytes written.

    Never writes past ``out`` and never holds more than ``len(out) + 1`` bytes of output: a
    payload that would decode to more is an error. Input is fed to each member in growing
    pieces (exactly its size when it carries the QZ extra field), so the bytes zlib hands
    back as unused stay small whatever the number of members.
    """
    pos, written, size = 0, 0, len(payload)
    while pos < size:
        d = zlib.decompressobj(31)  # one gzip member; zlib checks its CRC-32 and ISIZE
        member_start = pos
        feed = _qz_member_size(payload, pos) or _FIRST_FEED
        while not d.eof:
            if pos >= size:
                raise _error(channel, f"qzDecompress failed: gzip member at byte "
                             f"{member_start} is truncated", "payload", "truncated member",
                             "complete gzip members")
            piece = payload[pos:pos + feed]
            pos += len(piece)
            feed = min(feed * 2, _MAX_FEED)
            room = len(out) - written
            try:
                chunk = d.decompress(piece, room + 1)
            except zlib.error as exc:
                raise _error(channel, f"qzDecompress failed: gzip member at byte "
                             f"{member_start} is corrupt ({exc})", "payload",
                             f"corrupt member at byte {member_start}",
                             "valid gzip members") from None
            if len(chunk) > room:
                raise _error(channel, "qzDecompress failed: the payload decodes to more "
                             "than the packet's pages", "decoded_size", f"> {len(out)}",
                             len(out))
            out[written:written + len(chunk)] = chunk
            written += len(chunk)
        pos -= len(d.unused_data)
    return written


_FIRST_FEED = 1024
_MAX_FEED = 256 * 1024


def _qz_member_size(payload: memoryview, pos: int) -> int:
    """Total size of a QZ-extended member starting at ``pos`` (0 when it is not one)."""
    if len(payload) - pos < HEADER_SIZE:
        return 0
    magic, _, _, _, xlen, q, z, sublen, _, dest = _HEADER.unpack_from(payload, pos)
    if magic != _MAGIC or xlen != 12 or (q, z) != (ord("Q"), ord("Z")) or sublen != 8:
        return 0
    return HEADER_SIZE + dest + _TRAILER.size


def _error(channel: int, text: str, field: str, received: object, expected: object
           ) -> MethodError:
    return MethodError(f"multifd {channel}: {text}", field=field, received=received,
                       expected=expected, channel=channel)
