"""The ``liblz4`` engine: the system's liblz4 frame API through cffi (ABI mode, no compiler).

The library is looked up once per path: ``MULTIFD_LZ4_LIBRARY`` if set, else
``ctypes.util.find_library("lz4")``, else the soname ``liblz4.so.1``. cffi releases the GIL
around every C call, so channels compress in parallel.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
from typing import Any

from multifd_core.errors import LibraryNotFoundError, MethodError
from multifd_lz4._format import BLOCK_SIZE_ID, payload_bound

CDEF = """
typedef struct LZ4F_cctx_s LZ4F_cctx;
typedef struct LZ4F_dctx_s LZ4F_dctx;
typedef struct {
  int blockSizeID; int blockMode; int contentChecksumFlag; int frameType;
  unsigned long long contentSize; unsigned dictID; int blockChecksumFlag;
} LZ4F_frameInfo_t;
typedef struct {
  LZ4F_frameInfo_t frameInfo; int compressionLevel; unsigned autoFlush;
  unsigned favorDecSpeed; unsigned reserved[3];
} LZ4F_preferences_t;
typedef struct { unsigned stableSrc; unsigned reserved[3]; } LZ4F_compressOptions_t;
typedef struct {
  unsigned stableDst; unsigned skipChecksums; unsigned reserved1; unsigned reserved0;
} LZ4F_decompressOptions_t;
unsigned LZ4F_isError(size_t code);
const char* LZ4F_getErrorName(size_t code);
int LZ4_versionNumber(void);
size_t LZ4F_createCompressionContext(LZ4F_cctx** cctxPtr, unsigned version);
size_t LZ4F_freeCompressionContext(LZ4F_cctx* cctx);
size_t LZ4F_compressBegin(LZ4F_cctx* cctx, void* dst, size_t dstCapacity,
                          const LZ4F_preferences_t* prefs);
size_t LZ4F_compressUpdate(LZ4F_cctx* cctx, void* dst, size_t dstCapacity,
                           const void* src, size_t srcSize, const LZ4F_compressOptions_t* opt);
size_t LZ4F_flush(LZ4F_cctx* cctx, void* dst, size_t dstCapacity,
                  const LZ4F_compressOptions_t* opt);
size_t LZ4F_createDecompressionContext(LZ4F_dctx** dctxPtr, unsigned version);
size_t LZ4F_freeDecompressionContext(LZ4F_dctx* dctx);
size_t LZ4F_decompress(LZ4F_dctx* dctx, void* dst, size_t* dstSizePtr,
                       const void* src, size_t* srcSizePtr, const LZ4F_decompressOptions_t* opt);
"""
LZ4F_VERSION = 100
#: LZ4F_flush (flush without ending the frame) and block checksums need liblz4 1.8.0.
MIN_VERSION = 10800
#: What LZ4F_decompress asks for next when a payload ended on a block boundary: a block header.
BLOCK_HEADER_SIZE = 4


class Library:
    """A loaded liblz4: ``ffi``, ``lib``, where it was found and its version."""

    def __init__(self, ffi: Any, lib: Any, path: str) -> None:
        self.ffi, self.lib, self.path = ffi, lib, path
        v = lib.LZ4_versionNumber()
        self.version = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
        self.version_number = v

    def check(self, code: int, what: str) -> int:
        if self.lib.LZ4F_isError(code):
            name = self.ffi.string(self.lib.LZ4F_getErrorName(code)).decode()
            raise MethodError(f"lz4: {what} failed: {name}", field="payload",
                              received=name, expected="a valid lz4 block stream")
        return code


def library_path() -> str:
    return os.environ.get("MULTIFD_LZ4_LIBRARY") or _find_library() or "liblz4.so.1"


@functools.cache
def _find_library() -> str | None:
    """``ctypes.util.find_library``, once: it runs ``ldconfig -p`` (a process) each call."""
    return ctypes.util.find_library("lz4")


@functools.cache
def _load(path: str) -> Library:
    try:
        import cffi
    except ImportError:
        raise LibraryNotFoundError("cffi is not installed: pip install cffi") from None
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(path)
        found = Library(ffi, lib, path)
    except (OSError, AttributeError) as exc:
        raise LibraryNotFoundError(
            f"liblz4 not loadable from {path!r} ({exc}): install it (Debian/Ubuntu: apt-get "
            f"install liblz4-1; Fedora: dnf install lz4-libs) or point MULTIFD_LZ4_LIBRARY "
            f"at liblz4.so.1; the python-lz4 engine works without it") from None
    if found.version_number < MIN_VERSION:
        raise LibraryNotFoundError(f"liblz4 {found.version} at {path} is too old: need 1.8.0 "
                                   f"or newer")
    return found


def load() -> Library:
    """The liblz4 library, or ``LibraryNotFoundError`` saying how to get it."""
    return _load(library_path())


class NativeEncoder:
    """One channel's compression stream: a frame begun on the first packet, flushed per packet."""

    def __init__(self, level: int) -> None:
        self._l = load()
        ffi, lib = self._l.ffi, self._l.lib
        ptr = ffi.new("LZ4F_cctx **")
        self._l.check(lib.LZ4F_createCompressionContext(ptr, LZ4F_VERSION), "context")
        self._cctx = ptr[0]
        self._prefs = ffi.new("LZ4F_preferences_t *")
        self._prefs.frameInfo.blockSizeID = BLOCK_SIZE_ID
        self._prefs.frameInfo.blockChecksumFlag = 1
        self._prefs.compressionLevel = level
        self._started = False
        self._buf = bytearray(0)

    def compress(self, chunks: list[memoryview]) -> list[memoryview]:
        size = sum(c.nbytes for c in chunks)
        cap = payload_bound(size)
        if len(self._buf) < cap:
            self._buf = bytearray(cap)
        ffi, lib, check = self._l.ffi, self._l.lib, self._l.check
        with ffi.from_buffer(self._buf) as dst:
            pos = 0
            if not self._started:
                pos += check(lib.LZ4F_compressBegin(self._cctx, dst, cap, self._prefs), "begin")
                self._started = True
            for c in chunks:
                with ffi.from_buffer(c) as src:
                    pos += check(lib.LZ4F_compressUpdate(self._cctx, dst + pos, cap - pos, src,
                                                         c.nbytes, ffi.NULL), "compress")
            pos += check(lib.LZ4F_flush(self._cctx, dst + pos, cap - pos, ffi.NULL), "flush")
        # The view is valid until this channel's next packet; the core sends it before that.
        return [memoryview(self._buf)[:pos]]

    def close(self) -> None:
        if self._cctx is not None:
            self._l.lib.LZ4F_freeCompressionContext(self._cctx)
            self._cctx = None


class NativeDecoder:
    """One channel's decompression stream; each packet must decode to exactly its pages."""

    def __init__(self) -> None:
        self._l = load()
        ffi, lib = self._l.ffi, self._l.lib
        ptr = ffi.new("LZ4F_dctx **")
        self._l.check(lib.LZ4F_createDecompressionContext(ptr, LZ4F_VERSION), "context")
        self._dctx = ptr[0]
        self._dst_size = ffi.new("size_t *")
        self._src_size = ffi.new("size_t *")
        self._probe = ffi.new("char[1]")
        self._buf = bytearray(0)

    def decompress(self, payload: memoryview, size: int) -> memoryview:
        if len(self._buf) < size:
            self._buf = bytearray(size)  # bounded by the packet's pages, never by the peer
        ffi = self._l.ffi
        # Release the buffer exports on every path: a cdata left to the garbage collector
        # (an exception's traceback keeps this frame) can outlive the memoryview it exports.
        with ffi.from_buffer(self._buf) as dst, ffi.from_buffer(payload) as src:
            self._decompress(dst, src, len(payload), size)
        return memoryview(self._buf)[:size]

    def _decompress(self, dst: Any, src: Any, src_len: int, size: int) -> None:
        ffi, lib, check = self._l.ffi, self._l.lib, self._l.check
        out = used = 0
        hint = 0
        while used < src_len:
            self._dst_size[0] = size - out
            self._src_size[0] = src_len - used
            hint = check(lib.LZ4F_decompress(self._dctx, dst + out, self._dst_size, src + used,
                                             self._src_size, ffi.NULL), "decompress")
            out += self._dst_size[0]
            used += self._src_size[0]
            if hint == 0:
                raise MethodError("lz4: the payload ends the channel's frame", field="payload",
                                  received="an end mark", expected="a flushed block stream")
            if self._dst_size[0] == 0 and self._src_size[0] == 0:
                raise MethodError("lz4: payload decodes to more than the packet's pages",
                                  field="decoded_size", received=f"> {size}", expected=size)
        if out != size:
            raise MethodError(f"lz4: payload decodes to {out} bytes, the packet holds {size}",
                              field="decoded_size", received=out, expected=size)
        # A block decoded past the packet's pages waits in the context: ask it for one byte.
        self._dst_size[0] = 1
        self._src_size[0] = 0
        check(lib.LZ4F_decompress(self._dctx, self._probe, self._dst_size, ffi.NULL,
                                  self._src_size, ffi.NULL), "decompress")
        if self._dst_size[0]:
            raise MethodError("lz4: payload decodes to more than the packet's pages",
                              field="decoded_size", received=f"> {size}", expected=size)
        if hint != BLOCK_HEADER_SIZE:
            raise MethodError("lz4: payload does not end on a block boundary",
                              field="next_packet_size", received=src_len,
                              expected="whole lz4 blocks")

    def close(self) -> None:
        if self._dctx is not None:
            self._l.lib.LZ4F_freeDecompressionContext(self._dctx)
            self._dctx = None
