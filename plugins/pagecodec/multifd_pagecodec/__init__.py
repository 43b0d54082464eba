"""multifd-pagecodec: QEMU's per-page DEFLATE container (qpl, uadk), one C call a packet.

``compress`` turns a packet's contiguous pages into the whole payload (big-endian u32
lengths, then a level-1 DEFLATE blob per page, or the raw page when it does not shrink);
``decompress_into`` places every page of a payload whose length array the caller has already
validated. Both run in C with the GIL released (cffi), so channel threads run in parallel.

The extension is optional: ``AVAILABLE`` says whether it loaded and ``REASON`` why not.
``MULTIFD_PAGECODEC=off`` disables it (the plugins then use their Python per-page loop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__version__ = "0.1.0"
ENV = "MULTIFD_PAGECODEC"
INSTALL = ("install gcc, zlib1g-dev and libisal-dev (scripts/setup-system.sh as root on "
           "Debian), then rebuild it, bypassing pip's cache of the wheel built without them: "
           "pip install --no-cache-dir --force-reinstall --no-deps --no-binary "
           "multifd-pagecodec multifd-pagecodec (in a clone: pip install -e plugins/pagecodec)")
BACKEND_CODES = {"zlib": 0, "isal": 1}

# Statuses of decompress_into (pagecodec.h).
OK, BAD_LENGTH, SHORT_BLOB, CORRUPT, LENGTH, UNFINISHED, NOMEM, BAD_ARGS, NO_BACKEND = range(9)


def _load() -> tuple[Any, Any, str]:
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return None, None, f"disabled by {ENV}=off"
    try:
        from multifd_pagecodec._pagecodec import ffi, lib
    except ImportError as exc:
        return None, None, f"the C extension is not built ({exc}): {INSTALL}"
    return ffi, lib, ""


_ffi, _lib, REASON = _load()
AVAILABLE = _lib is not None


@dataclass(frozen=True)
class Failure:
    """Why a payload did not decode: the page, a status above, the bytes it decoded to
    (``page_size + 1``: more than a page; the blob length for BAD_LENGTH/SHORT_BLOB), and for
    CORRUPT the library's code and message."""

    page: int
    status: int
    got: int
    code: int
    detail: str

    def error(self, codec: Any) -> Exception | None:
        """The error ``codec``'s own per-page decoder raises for this failure, built with its
        ``corrupt_error(detail)``, ``length_error(got, unfinished)`` and (for SHORT_BLOB)
        ``short_error(length)``; None for a status those do not cover."""
        if self.status == CORRUPT:
            return codec.corrupt_error(self.detail)
        if self.status in (LENGTH, UNFINISHED):
            return codec.length_error(self.got, self.status == UNFINISHED)
        if self.status == SHORT_BLOB:
            return codec.short_error(self.got)
        return None


def backends() -> tuple[str, ...]:
    """The DEFLATE libraries this build has (``zlib``, and ``isal`` when linked)."""
    if _lib is None:
        return ()
    mask = _lib.pc_backends()
    return tuple(name for name, code in BACKEND_CODES.items() if mask >> code & 1)


def library_version(backend: str) -> str:
    """The version of the C library a backend runs (zlib's runtime, ISA-L's headers)."""
    if _lib is None:
        return ""
    if backend == "zlib":
        return _ffi.string(_lib.pc_zlib_version()).decode()
    v = _lib.pc_isal_version()
    return f"{v >> 16}.{v >> 8 & 0xFF}.{v & 0xFF}" if v else "unknown"


def supports(backend: str) -> bool:
    return backend in backends()


def why_not(backend: str) -> str | None:
    """None when the C helper runs ``backend`` here, else why not (for engine reports)."""
    if _lib is None:
        return REASON
    if not supports(backend):
        return f"multifd-pagecodec was built without {backend}: {INSTALL}"
    return None


def report(backend: str) -> str:
    """Which path a software engine with this backend runs here, for its engine info."""
    why = why_not(backend)
    if why is None:
        return (f"native per-packet helper (multifd-pagecodec {__version__}, {backend} "
                f"{library_version(backend)})")
    return f"Python per-page loop (native helper unavailable: {why})"


def compress(backend: str, wbits: int, pages: Any, n: int, page_size: int, out: Any) -> int:
    """Write the payload of ``n`` contiguous pages into ``out`` (at least ``n * (4 +
    page_size)`` bytes); return its length. ``wbits`` as zlib's (negative: raw DEFLATE)."""
    with _ffi.from_buffer("uint8_t[]", pages) as src, \
            _ffi.from_buffer("uint8_t[]", out, require_writable=True) as dst:
        if len(src) < n * page_size:
            raise ValueError(f"{len(src)} bytes of pages for {n} pages of {page_size}")
        size = _lib.pc_compress(BACKEND_CODES[backend], wbits, src, n, page_size, dst, len(dst))
    if size < 0:
        if -size == NOMEM:
            raise MemoryError("pagecodec: out of memory")
        raise ValueError(f"pagecodec: compress({backend!r}, wbits={wbits}) failed with "
                         f"status {-size}")
    return int(size)


def decompress_into(backend: str, skip: int, min_len: int, payload: Any, n: int,
                    page_size: int, out: Any) -> Failure | None:
    """Decode a payload of ``n`` pages into ``out`` (exactly ``n * page_size`` bytes): raw
    pages copied, the others inflated after skipping ``skip`` bytes (blobs shorter than
    ``min_len`` refused). None when every page decoded to exactly one page."""
    if len(out) != n * page_size:
        raise ValueError(f"output of {len(out)} bytes for {n} pages of {page_size}")
    fail = _ffi.new("pc_failure *")
    with _ffi.from_buffer("uint8_t[]", payload) as src, \
            _ffi.from_buffer("uint8_t[]", out, require_writable=True) as dst:
        status = _lib.pc_decompress(BACKEND_CODES[backend], skip, min_len, src, len(src), n,
                                    page_size, dst, fail)
    if status == OK:
        return None
    if status == NOMEM:
        raise MemoryError("pagecodec: out of memory")
    return Failure(int(fail.page), int(status), int(fail.got), int(fail.code),
                   _ffi.string(fail.detail).decode(errors="replace"))


class PacketCodec:
    """One channel's codec for one blob format: a backend, zlib-style ``wbits`` for
    compression, and the header bytes to ``skip`` and the shortest blob (``min_len``) for
    decompression. ``compress`` writes into a buffer reused from packet to packet."""

    def __init__(self, backend: str, page_size: int, *, wbits: int, skip: int = 0,
                 min_len: int = 1) -> None:
        if not supports(backend):
            raise ValueError(f"pagecodec has no {backend} backend here: "
                             f"{REASON or 'built without it'}")
        self.backend, self.page_size = backend, page_size
        self.wbits, self.skip, self.min_len = wbits, skip, min_len
        self._out = bytearray()

    def compress(self, pages: Any, n: int) -> memoryview:
        need = n * (4 + self.page_size)
        if len(self._out) < need:
            self._out = bytearray(need)  # a new buffer: views of the old one stay valid
        size = compress(self.backend, self.wbits, pages, n, self.page_size, self._out)
        return memoryview(self._out)[:size]

    def decompress_into(self, payload: Any, n: int, out: Any) -> Failure | None:
        return decompress_into(self.backend, self.skip, self.min_len, payload, n,
                               self.page_size, out)
