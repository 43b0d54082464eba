"""Raw DEFLATE per page in software: ISA-L (``isal`` package) when installed, zlib otherwise.

Compression: level 1, 4 KiB history (``wbits=-12``), one complete stream per page, so IAA
hardware on the peer can decode it. Decompression accepts any complete raw DEFLATE stream
(up to a 32 KiB window), bounded to one page of output.

Two paths, same bytes: ``multifd_pagecodec`` (C, one call a packet, GIL released) when it is
built with the backend, else ``DeflateCodec``'s loop calling the Python module per page.
"""

from __future__ import annotations

import zlib
from types import ModuleType
from typing import Any

import multifd_pagecodec as pagecodec
from multifd_core.errors import MethodError

try:  # ISA-L: about 2.5x zlib's speed at level 1 on x86-64
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - exercised when isal is not installed
    _isal = None


BACKENDS = ("isal", "zlib")
HISTORY_WBITS = -12  # 4 KiB history: what IAA can decode


def default_backend() -> str:
    return "isal" if _isal is not None else "zlib"


def backend_version(backend: str, native: bool = True) -> str:
    """The version of the library the software engine runs for ``backend``, and which path
    (``native=False``: the Python loop even where the C helper runs)."""
    if native and pagecodec.why_not(backend) is None:
        return f"{pagecodec.library_version(backend)}, native per packet"
    if backend == "isal":
        import isal
        return f"{isal.__version__}, Python per page"
    return f"{zlib.ZLIB_RUNTIME_VERSION}, Python per page"


def native_codec(backend: str, page_size: int) -> Any:
    """The per-packet C codec for ``backend``, or None when it cannot run here."""
    if pagecodec.why_not(backend) is not None:
        return None
    return pagecodec.PacketCodec(backend, page_size, wbits=HISTORY_WBITS)


class DeflateCodec:
    """Per-page raw DEFLATE with one of the backends; methods are called once per page."""

    def __init__(self, page_size: int, channel: int, backend: str | None = None) -> None:
        backend = backend or default_backend()
        if backend == "isal" and _isal is None:
            raise MethodError("the isal backend needs the isal package: pip install isal",
                              field="backend", received=backend, expected="zlib")
        self.backend = backend
        self.page_size = page_size
        self.channel = channel
        module: ModuleType = _isal if backend == "isal" else zlib
        self._compress = module.compress
        self._decompressobj = module.decompressobj
        self._errors: tuple[type[BaseException], ...] = (zlib.error,) if module is zlib else \
            (module.error, zlib.error)

    def compress(self, page: memoryview) -> bytes:
        """The page as raw DEFLATE (the caller sends it raw when this is not smaller)."""
        return self._compress(page, 1, HISTORY_WBITS)

    def compress_pages(self, rows: list[memoryview]) -> list[bytes]:
        compress, wbits = self._compress, HISTORY_WBITS
        return [compress(row, 1, wbits) for row in rows]

    def decode(self, blob: memoryview, dst: memoryview) -> None:
        """Inflate ``blob`` into ``dst``, which it must fill exactly."""
        size = self.page_size
        d = self._decompressobj(-15)
        try:
            page = d.decompress(blob, size + 1)
        except self._errors as exc:
            raise self.corrupt_error(str(exc)) from None
        if len(page) != size or not d.eof:
            raise self.length_error(len(page), not d.eof and len(page) <= size)
        dst[:] = page

    def corrupt_error(self, detail: str) -> MethodError:
        return MethodError(f"multifd {self.channel}: qpl job failed with error (invalid "
                           f"DEFLATE data: {detail})", field="blob", received="invalid DEFLATE",
                           expected="raw DEFLATE stream", channel=self.channel)

    def length_error(self, got: int, unfinished: bool) -> MethodError:
        shown = f"{got} (stream unfinished)" if unfinished else got
        return MethodError(f"multifd {self.channel}: qpl decompressed len {shown}, expected "
                           f"len {self.page_size}", field="decompressed_len", received=shown,
                           expected=self.page_size, channel=self.channel)
