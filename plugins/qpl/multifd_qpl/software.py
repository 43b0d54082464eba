"""Raw DEFLATE per page in software: ISA-L (``isal`` package) when installed, zlib otherwise.

Compression: level 1, 4 KiB history (``wbits=-12``), one complete stream per page, so IAA
hardware on the peer can decode it. Decompression accepts any complete raw DEFLATE stream
(up to a 32 KiB window), bounded to one page of output.
"""

from __future__ import annotations

import zlib
from types import ModuleType

from multifd_core.errors import MethodError

try:  # ISA-L: about 2.5x zlib's speed at level 1 on x86-64
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - exercised when isal is not installed
    _isal = None

BACKENDS = ("isal", "zlib")
HISTORY_WBITS = -12  # 4 KiB history: what IAA can decode


def default_backend() -> str:
    return "isal" if _isal is not None else "zlib"


def backend_version(backend: str) -> str:
    if backend == "isal":
        import isal
        return str(isal.__version__)
    return zlib.ZLIB_RUNTIME_VERSION


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
            raise MethodError(f"multifd {self.channel}: qpl job failed with error "
                              f"(invalid DEFLATE data: {exc})", field="blob",
                              received="invalid DEFLATE", expected="raw DEFLATE stream",
                              channel=self.channel) from None
        if len(page) != size or not d.eof:
            got = len(page) if d.eof or len(page) > size else f"{len(page)} (stream unfinished)"
            raise MethodError(f"multifd {self.channel}: qpl decompressed len {got}, expected "
                              f"len {size}", field="decompressed_len", received=got,
                              expected=size, channel=self.channel)
        dst[:] = page
