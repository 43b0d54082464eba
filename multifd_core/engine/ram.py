"""RAM blocks: a name, a buffer of ``used_length`` bytes, and a page size."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.digest import (
    data_extents,
    digest_of,
    digest_of_extents,
    digest_of_file,
)
from multifd_core.errors import MultiFDError, io_error
from multifd_core.wire import RAMBLOCK_NAME_LEN, check_page_size
from multifd_core.wire.pages import page_runs, run_bounds


class RamBlock:
    """A named RAM block over any buffer (bytes, bytearray, mmap, numpy array).

    ``array`` is a flat uint8 view, ``pages`` a ``(n_pages, page_size)`` view and ``words`` a
    ``(n_pages, page_size // 8)`` uint64 view, all without copying.
    """

    def __init__(self, name: str, buffer: Any, *, page_size: int = 4096,
                 used_length: int | None = None) -> None:
        raw = name.encode()
        if not raw or len(raw) >= RAMBLOCK_NAME_LEN or b"\0" in raw:
            raise MultiFDError(f"ramblock name {name!r} must be 1 to 255 bytes with no NUL")
        check_page_size(page_size)
        array = np.frombuffer(buffer, dtype=np.uint8) if len(memoryview(buffer).cast("B")) \
            else np.zeros(0, dtype=np.uint8)
        length = len(array) if used_length is None else used_length
        if length % page_size or length > len(array):
            raise MultiFDError(
                f"ramblock {name}: used length {length} must be a multiple of the page size "
                f"{page_size} and at most the buffer size {len(array)}")
        self.name = name
        self.page_size = page_size
        self.used_length = length
        self.array = array[:length]
        self.writable = bool(self.array.flags.writeable)
        self._owner = buffer
        self._closers: list[Any] = []
        self._fd: int | None = None
        self._fd_offset = 0  # file offset of the block's first byte (map_region)
        self._owns_fd = True
        #: Where the block is stored, for messages (its file's path), if anywhere.
        self.origin: str | None = None
        #: A read-only file's holes, looked up when it was opened: ``(starts, ends)`` page
        #: numbers of the ranges that read as zeros (None: not known). The sender's zero-page
        #: scan and ``digest`` skip them rather than read them: a hole read through a mapping
        #: makes the kernel allocate and zero a page-cache page for every page of it.
        self.holes: tuple[np.ndarray, np.ndarray] | None = None
        self._extents: list[tuple[int, int]] | None = None  # the same, as data byte ranges

    @property
    def n_pages(self) -> int:
        return self.used_length // self.page_size

    @property
    def pages(self) -> np.ndarray:
        return self.array.reshape(self.n_pages, self.page_size)

    @property
    def words(self) -> np.ndarray:
        return self.array.view(np.uint64).reshape(self.n_pages, self.page_size // 8)

    def digest(self, algorithm: str = DEFAULT_DIGEST, *, threads: bool = True) -> str:
        """The block's digest (``engine.digest``: BLAKE3 by default, on all cores unless
        ``threads`` is false)."""
        if self._fd is not None:
            return digest_of_file(self.array, self._fd, self._fd_offset, algorithm,
                                  threads=threads)
        if self._extents is not None:
            return digest_of_extents(self.array, self._extents, algorithm, threads=threads)
        return digest_of(self.array, algorithm, threads=threads)

    def _find_holes(self, fd: int, offset: int) -> None:
        """Record where ``fd``'s ``used_length`` bytes from ``offset`` may hold data (for the
        digest) and its holes in whole pages (``holes``)."""
        self._extents = data_extents(fd, offset, self.used_length)
        ps, starts, ends, pos = self.page_size, [], [], 0
        for a, b in [*self._extents, (self.used_length, self.used_length)]:
            first, last = -(-pos // ps), a // ps  # the whole pages of the gap [pos, a)
            if last > first:
                starts.append(first)
                ends.append(last)
            pos = b
        self.holes = (np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))

    def sha256(self) -> str:
        return self.digest("sha256")

    @property
    def fd(self) -> int:
        """The descriptor of a file-backed block (``create_file``, writable ``map_region``)."""
        if self._fd is None:
            raise MultiFDError(f"ramblock {self.name} is not file-backed")
        return self._fd

    @property
    def file_backed(self) -> bool:
        """True for a block made by ``create_file``: ``write_pages`` goes through the file."""
        return self._fd is not None

    def write_pages(self, index: np.ndarray, data: Any) -> None:
        """Store the ``len(index)`` pages of ``data`` (contiguous) at page numbers ``index``.

        A file-backed block is written with ``pwrite``, one call per run of adjacent pages:
        stores through its shared mapping fault every page in, and the kernel's read-ahead
        zero-fills the neighbouring holes too (2-4x slower for a receiver's scattered pages).
        Any other block takes a numpy store. ``index`` may be unsorted (QEMU's zero-page
        split reorders offsets): a run is pages ascending by one."""
        n, ps = len(index), self.page_size
        view = memoryview(data).cast("B")
        if len(view) != n * ps:
            raise MultiFDError(f"ramblock {self.name}: {len(view)} bytes for {n} pages")
        if not n:
            return
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= self.n_pages:
            raise MultiFDError(f"ramblock {self.name}: page {low if low < 0 else high} "
                               f"outside its {self.n_pages} pages")
        starts, ends = run_bounds(index)
        if self._fd is None:
            src = np.frombuffer(view, dtype=np.uint8).reshape(n, ps)
            if len(starts) == 1:
                first = int(index[0])
                self.pages[first : first + n] = src
            else:
                self.pages[index] = src
            return
        fd, base = self._fd, self._fd_offset
        offsets = (index[starts] * ps + base).tolist()
        try:
            for a, b, offset in zip((starts * ps).tolist(), (ends * ps).tolist(), offsets,
                                    strict=True):
                if os.pwrite(fd, view[a:b], offset) != b - a:
                    _pwrite_all(fd, view[a:b], offset)
        except OSError as exc:
            raise self.write_error(exc) from None

    @property
    def writes_by_copy(self) -> bool:
        """Raw pages should come through ``write_pages`` (a file), not ``page_views``."""
        return self._fd is not None

    def page_views(self, index: np.ndarray) -> list[memoryview]:
        """Writable views of pages ``index`` (one per run of adjacent pages), in order."""
        return page_runs(self.array, index, self.page_size)

    def write_error(self, exc: OSError) -> MultiFDError:
        """A failed store into this block as one line naming its file. A store through the
        mapping into a sparse file the disk cannot hold fails with EFAULT (SIGBUS outside a
        system call): that is a full disk too."""
        where = self.origin or f"ramblock {self.name}"
        if exc.errno == errno.EFAULT and self._fd is not None:
            try:
                st = os.fstatvfs(self._fd)
                if st.f_bavail * st.f_frsize < 16 * self.page_size:
                    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                pass
        return io_error(exc, where)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], name: str | None = None, *,
                  page_size: int = 4096) -> RamBlock:
        """A read-only block mapped from ``path`` (its length must be whole pages); its holes
        are looked up now (``holes``)."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            raise MultiFDError(f"cannot read {p}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size % page_size:
                raise MultiFDError(f"{p}: size {size} is not a multiple of the page size "
                                   f"{page_size}")
            buf: Any = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
            block = cls(name or p.name, buf, page_size=page_size)
            if size:
                block._closers.append(buf)
                block._find_holes(fd, 0)
        finally:
            os.close(fd)
        return block

    @classmethod
    def create_file(cls, path: str | os.PathLike[str], name: str, length: int, *,
                    page_size: int = 4096) -> RamBlock:
        """A writable block backed by a new sparse file of ``length`` bytes (reads as zero).

        ``path`` must not exist (it is created with ``O_EXCL | O_NOFOLLOW``)."""
        fd = os.open(Path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            return cls.from_fd(fd, name, length, page_size=page_size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, name: str, length: int, *, page_size: int = 4096) -> RamBlock:
        """A writable block over the open file ``fd``, sized to ``length`` bytes; the block
        owns ``fd`` from then on (one descriptor per block: the mapping holds none)."""
        os.ftruncate(fd, length)
        mapping = FileMapping(fd, length) if length else None
        block = cls(name, mapping.buffer if mapping else bytearray(), page_size=page_size)
        block._fd = fd  # kept for pwrite and fsync, which (unlike msync) run without the GIL
        if mapping is not None:
            block._closers.append(mapping)
        return block

    @classmethod
    def map_region(cls, fd: int, name: str, offset: int, length: int, *,
                   page_size: int = 4096, writable: bool = False) -> RamBlock:
        """A block over ``length`` bytes of the open file ``fd`` from ``offset`` (a multiple
        of the mmap granularity), such as a pages region of a mapped-ram file. A writable one
        takes ``write_pages`` through the file (pwrite at ``offset``). ``fd`` stays the
        caller's: it must outlive the block."""
        mapping: Any = None
        if not length:
            buf: Any = bytearray() if writable else b""
        elif writable:
            mapping = FileMapping(fd, length, offset)
            buf = mapping.buffer
        else:
            buf = mapping = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=offset)
        block = cls(name, buf, page_size=page_size)
        if mapping is not None:
            block._closers.append(mapping)
        if writable:
            block._fd, block._fd_offset, block._owns_fd = fd, offset, False
        elif length:
            block._find_holes(fd, offset)
        return block

    @classmethod
    def zeros(cls, name: str, length: int, *, page_size: int = 4096) -> RamBlock:
        """A zero-filled block in anonymous memory, its own mapping: pages are allocated on
        first write, and ``close`` gives them back to the system at once (a heap allocation
        could stay with the process under glibc's sliding mmap threshold)."""
        if not length:
            return cls(name, bytearray(), page_size=page_size)
        buf = mmap.mmap(-1, length)
        block = cls(name, buf, page_size=page_size)
        block._closers.append(buf)
        return block

    def flush(self) -> None:
        """Write a file-backed block's pages to disk (pages written through the mapping too),
        durably (``fdatasync``: the file's size was set when it was created)."""
        if self._fd is not None:
            os.fdatasync(self._fd)
            return
        for c in self._closers:
            c.flush()

    def close(self) -> None:
        """Release the mapping (views of this block must be gone)."""
        self.array = np.zeros(0, dtype=np.uint8)
        self._owner = None
        for c in self._closers:
            try:
                c.close()
            except BufferError:
                pass  # a view still lives; the mapping goes with it
        self._closers.clear()
        if self._fd is not None:
            if self._owns_fd:
                os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, {self.used_length} bytes, page {self.page_size})"


class FileMapping:
    """A shared read-write mapping of a file, made with the C library's ``mmap``. Python's
    ``mmap.mmap`` keeps a duplicate of the file's descriptor, so a block would hold two; this
    holds none (the block keeps the one it writes and syncs through). The mapping is undone
    when ``buffer`` and every view of it are gone."""

    def __init__(self, fd: int, length: int, offset: int = 0) -> None:
        addr = _libc.mmap(None, length, _PROT_RW, _MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr, self.length = addr, length
        self.buffer: Any = (ctypes.c_ubyte * length).from_address(addr)
        # Not at exit: a daemon thread may still be inside a system call on these pages
        # (the process's end unmaps them anyway).
        weakref.finalize(self.buffer, _libc.munmap, addr, length).atexit = False

    def flush(self) -> None:
        if self.buffer is not None and _libc.msync(self.addr, self.length, _MS_SYNC):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        """Drop this reference; the memory is unmapped once no view of it is left."""
        self.buffer = None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED = mmap.MAP_SHARED
_MAP_FAILED = ctypes.c_void_p(-1).value
_MS_SYNC = 4


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
