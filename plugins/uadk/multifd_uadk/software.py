"""UADK's per-page blob in software: a zlib stream (``78 9C`` header), decoded by skipping
the first two bytes, as UADK's driver does, and inflating the rest as raw DEFLATE, bounded
to one page. The Adler-32 trailer is not required (and not checked when present).

Two paths, same bytes: ``multifd_pagecodec`` (C, one call a packet, GIL released) when it is
built, else ``ZlibPageCodec`` calling zlib per page.
"""

from __future__ import annotations

import zlib
from typing import Any

import multifd_pagecodec as pagecodec
from multifd_core.errors import MethodError

HEADER = 2  # bytes of zlib header UADK's driver skips unseen
MIN_BLOB = 3


def native_codec(page_size: int) -> Any:
    """The per-packet C codec (zlib-wrapped level 1; decoding skips the header), or None."""
    if pagecodec.why_not("zlib") is not None:
        return None
    return pagecodec.PacketCodec("zlib", page_size, wbits=zlib.MAX_WBITS, skip=HEADER,
                                 min_len=MIN_BLOB)


class ZlibPageCodec:
    def __init__(self, page_size: int, channel: int) -> None:
        self.page_size = page_size
        self.channel = channel

    def compress(self, page: memoryview) -> bytes:
        """What UADK hardware writes for a page: a zlib stream (used by tests and by the
        ``software-compress`` sender option; QEMU's sender without hardware sends raw)."""
        return zlib.compress(page, 1)

    def compress_pages(self, rows: list[memoryview]) -> list[bytes]:
        return [zlib.compress(row, 1) for row in rows]

    def decode(self, blob: memoryview, dst: memoryview) -> None:
        size = self.page_size
        if len(blob) < MIN_BLOB:
            raise self.short_error(len(blob))
        d = zlib.decompressobj(-15)
        try:
            page = d.decompress(blob[HEADER:], size + 1)
        except zlib.error as exc:
            raise self.corrupt_error(str(exc)) from None
        if len(page) != size or not d.eof:
            raise self.length_error(len(page), not d.eof and len(page) <= size)
        dst[:] = page

    def short_error(self, n: int) -> MethodError:
        return self._error(f"blob of {n} bytes is too short for a zlib stream", "blob", n,
                           f">= {MIN_BLOB} bytes")

    def corrupt_error(self, detail: str) -> MethodError:
        return self._error(f"failed decompression ({detail})", "blob", "invalid DEFLATE",
                           "zlib stream")

    def length_error(self, got: int, unfinished: bool) -> MethodError:
        return self._error("decompressed length error", "decompressed_len",
                           f"{got} (stream unfinished)" if unfinished else got,
                           self.page_size)

    def _error(self, text: str, field: str, received: object, expected: object
               ) -> MethodError:
        return MethodError(f"multifd {self.channel}: {text}", field=field, received=received,
                           expected=expected, channel=self.channel)
