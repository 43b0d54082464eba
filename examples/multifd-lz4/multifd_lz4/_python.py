"""The ``python-lz4`` engine: the ``lz4`` wheel from PyPI, which bundles its own liblz4.

It produces the same frame as the ``liblz4`` engine (linked 64 KiB blocks with block
checksums, flushed per packet), so either end may use either engine.
"""

from __future__ import annotations

from multifd_core.errors import MethodError
from multifd_lz4._format import BLOCK_SIZE_ID


def version() -> str:
    import lz4

    return lz4.library_version_string()


class PythonEncoder:
    def __init__(self, level: int) -> None:
        import lz4.frame

        self._frame = lz4.frame
        self._ctx = lz4.frame.create_compression_context()
        self._level = level
        self._started = False

    def compress(self, chunks: list[memoryview]) -> list[bytes]:
        f = self._frame
        parts: list[bytes] = []
        if not self._started:
            parts.append(f.compress_begin(self._ctx, compression_level=self._level,
                                          block_size=BLOCK_SIZE_ID, block_linked=True,
                                          block_checksum=True, content_checksum=False,
                                          auto_flush=False))
            self._started = True
        for c in chunks:
            parts.append(f.compress_chunk(self._ctx, c))
        parts.append(f.compress_flush(self._ctx, end_frame=False))
        return [p for p in parts if p]

    def close(self) -> None:
        self._ctx = None


class PythonDecoder:
    def __init__(self) -> None:
        import lz4.frame

        self._d = lz4.frame.LZ4FrameDecompressor()

    def decompress(self, payload: memoryview, size: int) -> bytes:
        try:
            out = self._d.decompress(payload, max_length=size)  # bounded by the pages
        except (RuntimeError, ValueError) as exc:
            raise MethodError(f"lz4: decompress failed: {exc}", field="payload",
                              received=type(exc).__name__,
                              expected="a valid lz4 block stream") from None
        if self._d.eof:
            raise MethodError("lz4: the payload ends the channel's frame", field="payload",
                              received="an end mark", expected="a flushed block stream")
        if not self._d.needs_input:
            raise MethodError("lz4: payload decodes to more than the packet's pages",
                              field="decoded_size", received=f"> {size}", expected=size)
        if len(out) != size:
            raise MethodError(f"lz4: payload decodes to {len(out)} bytes, the packet holds "
                              f"{size}", field="decoded_size", received=len(out), expected=size)
        return out

    def close(self) -> None:
        self._d = None
