"""UADK's per-page blob in software: a zlib stream (``78 9C`` header), decoded by skipping
the first two bytes, as UADK's driver does, and inflating the rest as raw DEFLATE, bounded
to one page. The Adler-32 trailer is not required (and not checked when present)."""

from __future__ import annotations

import zlib

from multifd_core.errors import MethodError


class ZlibPageCodec:
    def __init__(self, page_size: int, channel: int) -> None:
        self.page_size = page_size
        self.channel = channel

    def compress(self, page: memoryview) -> bytes:
        """What UADK hardware writes for a page: a zlib stream (used by tests and by the
        ``software-compress`` sender option; QEMU's sender without hardware sends raw)."""
        return zlib.compress(page, 1)

    def decode(self, blob: memoryview, dst: memoryview) -> None:
        size = self.page_size
        if len(blob) < 3:
            raise self._error(f"blob of {len(blob)} bytes is too short for a zlib stream",
                              "blob", len(blob), ">= 3 bytes")
        d = zlib.decompressobj(-15)
        try:
            page = d.decompress(blob[2:], size + 1)
        except zlib.error as exc:
            raise self._error(f"failed decompression ({exc})", "blob", "invalid DEFLATE",
                              "zlib stream") from None
        if len(page) != size or not d.eof:
            raise self._error("decompressed length error", "decompressed_len",
                              len(page) if d.eof or len(page) > size else
                              f"{len(page)} (stream unfinished)", size)
        dst[:] = page

    def _error(self, text: str, field: str, received: object, expected: object
               ) -> MethodError:
        return MethodError(f"multifd {self.channel}: {text}", field=field, received=received,
                           expected=expected, channel=self.channel)
