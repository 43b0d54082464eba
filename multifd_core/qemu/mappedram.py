"""QEMU's mapped-ram file layout (``migrate file:PATH`` with the ``mapped-ram`` capability),
sans-IO: the per-block header, where the bitmap and the pages go, and the bitmap itself.

In a mapped-ram file every RAM block listed in the RAM START section is followed by a 28-byte
header (big-endian: be32 version, be64 page size, be64 bitmap offset, be64 pages offset; all
offsets absolute in the file). The bitmap (one bit per page, set for a page stored in the file)
follows the header; the pages region starts at the next 1 MiB boundary after it, page ``i`` at
``pages_offset + i * page_size``; the main stream goes on right after the pages region. The
bitmap is QEMU's in-memory ``unsigned long`` array: 64-bit little-endian words on the hosts
QEMU saves from here (x86-64, aarch64), i.e. bit ``i % 8`` of byte ``i // 8``. docs/mapped-ram.md
describes the whole file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from multifd_core.errors import MultiFDError

CAPABILITY = "mapped-ram"
VERSION = 1
#: Where QEMU starts each pages region: the next multiple of 1 MiB (for O_DIRECT).
ALIGNMENT = 1 << 20
HEADER = struct.Struct(">IQQQ")
HEADER_SIZE = HEADER.size  # 28, packed
#: Bytes per bitmap word (QEMU's unsigned long on a 64-bit host).
WORD = 8


class MappedRamError(MultiFDError):
    """A mapped-ram file (or a header in it) that cannot be read or restored as it is."""

    def __init__(self, message: str, *, field: str | None = None, received: Any = None,
                 expected: Any = None, offset: int | None = None) -> None:
        self.field = field
        self.received = received
        self.expected = expected
        self.offset = offset
        text = message
        if field is not None:
            text += f" [field {field}: received {received}, expected {expected}]"
        if offset is not None:
            text += f" (file offset {offset:#x})"
        super().__init__(text)


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


def bitmap_size(n_pages: int) -> int:
    """Bytes of the bitmap for ``n_pages`` pages: whole 64-bit words."""
    return -(-n_pages // (8 * WORD)) * WORD


@dataclass(frozen=True)
class MappedRamHeader:
    """One block's header. ``length`` (not in the header: the block list carries it) is kept
    alongside so the regions can be checked and laid out."""

    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def encode(self) -> bytes:
        return HEADER.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> MappedRamHeader:
        if len(raw) != HEADER_SIZE:
            raise MappedRamError("mapped-ram header cut short", field="header",
                                 received=f"{len(raw)} bytes", expected=f"{HEADER_SIZE} bytes")
        return cls(*HEADER.unpack(raw))

    @classmethod
    def layout(cls, header_offset: int, length: int, page_size: int) -> MappedRamHeader:
        """The header QEMU writes at ``header_offset`` for a block of ``length`` bytes: the
        bitmap right after the header, the pages at the next 1 MiB boundary after it."""
        bitmap_offset = header_offset + HEADER_SIZE
        pages = align_up(bitmap_offset + bitmap_size(length // page_size))
        return cls(VERSION, page_size, bitmap_offset, pages)

    def bitmap_end(self, length: int) -> int:
        return self.bitmap_offset + bitmap_size(length // self.page_size)

    def end(self, length: int) -> int:
        """File offset right after the pages region: where the main stream goes on."""
        return self.pages_offset + length

    def validate(self, block: str, length: int, *, page_size: int, header_offset: int,
                 file_size: int | None) -> None:
        """Every check a reader needs before it trusts the offsets (one error, naming the
        field): version, page size, alignment, and the bitmap and pages inside the file, in
        order after the header (so the stream always moves forward)."""
        where = f"ramblock {block}: mapped-ram header"
        at = header_offset
        if self.version != VERSION:
            raise MappedRamError(f"{where}: unknown version", field="version",
                                 received=self.version, expected=VERSION, offset=at)
        if self.page_size != page_size:
            raise MappedRamError(f"{where}: page size mismatch", field="page_size",
                                 received=self.page_size, expected=page_size, offset=at)
        if length % page_size:
            raise MappedRamError(f"ramblock {block}: length is not a whole number of pages",
                                 field="length", received=f"{length:#x}",
                                 expected=f"a multiple of {page_size:#x}", offset=at)
        header_end = header_offset + HEADER_SIZE
        if self.bitmap_offset < header_end:
            raise MappedRamError(f"{where}: bitmap offset inside the stream before it",
                                 field="bitmap_offset", received=f"{self.bitmap_offset:#x}",
                                 expected=f">= {header_end:#x}", offset=at)
        bitmap_end = self.bitmap_end(length)
        if file_size is not None and bitmap_end > file_size:
            room = max(file_size - (bitmap_end - self.bitmap_offset), 0)
            raise MappedRamError(f"{where}: bitmap offset outside the file",
                                 field="bitmap_offset", received=f"{self.bitmap_offset:#x}",
                                 expected=f"<= {room:#x} (file of {file_size:#x} bytes)",
                                 offset=at)
        if self.pages_offset % page_size:
            raise MappedRamError(f"{where}: pages region not aligned to the page size",
                                 field="pages_offset", received=f"{self.pages_offset:#x}",
                                 expected=f"a multiple of {page_size:#x}", offset=at)
        if self.pages_offset < bitmap_end:
            raise MappedRamError(f"{where}: pages region overlaps the bitmap",
                                 field="pages_offset", received=f"{self.pages_offset:#x}",
                                 expected=f">= {bitmap_end:#x}", offset=at)
        if file_size is not None and self.end(length) > file_size:
            raise MappedRamError(f"{where}: pages offset outside the file",
                                 field="pages_offset", received=f"{self.pages_offset:#x}",
                                 expected=f"<= {max(file_size - length, 0):#x} (file of "
                                          f"{file_size:#x} bytes, block of {length:#x})",
                                 offset=at)


# --------------------------------------------------------------------------- the bitmap


def bitmap_to_mask(raw: bytes | bytearray | memoryview | np.ndarray, n_pages: int) -> np.ndarray:
    """Bool per page (True: stored in the file) from bitmap bytes covering ``n_pages``; the
    padding bits of the last word are ignored, as QEMU ignores them."""
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    return np.unpackbits(data, bitorder="little", count=n_pages).astype(bool)


def mask_to_bitmap(mask: np.ndarray) -> bytes:
    """Bitmap bytes for a bool per page, padded to whole 64-bit words."""
    out = np.packbits(mask, bitorder="little").tobytes()
    return out + bytes(bitmap_size(len(mask)) - len(out))


def present_pages(raw: bytes | bytearray | memoryview | np.ndarray, n_pages: int) -> np.ndarray:
    """Page numbers (ascending int64) whose bit is set."""
    return np.flatnonzero(bitmap_to_mask(raw, n_pages)).astype(np.int64)


def page_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of True in ``mask``: pages ``starts[k]`` to ``ends[k] - 1``."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
