"""Output directories that only ever write entries they created themselves.

Whatever already sits in an output directory is untrusted: someone who could write there before
the run may have planted a symbolic link at a name we are about to write, hoping we truncate its
target. ``OutputDir`` opens the directory once and works relative to that descriptor: every file
is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``; a stale entry in the way is unlinked (the link
itself, never what it points to) or, if it is a directory, refused; renames stay inside the
directory descriptor. ``FileOutput`` writes a session's RAM blocks and its manifest through it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import IO, Any, TypeVar

from multifd_core.engine.ram import RamBlock
from multifd_core.engine.writeback import flush_beside
from multifd_core.errors import MultiFDError, io_error

T = TypeVar("T")

log = logging.getLogger("multifd.outdir")

PARTIAL = ".partial"
MANIFEST = "manifest.json"
#: The longest file name we create, in bytes (most file systems allow 255).
NAME_MAX = 255
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def printable(text: str, limit: int = 80) -> str:
    """``text`` for a message or a log line: control characters, escape sequences and
    non-ASCII escaped (``\\x1b``, ``\\n``, ``\\u00e9``), cut to ``limit`` characters."""
    shown = ascii(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")


class OutputDir:
    """One output directory, opened once (created if missing); see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise MultiFDError(f"cannot use {self.path} as the output directory: "
                               f"{exc.strerror or exc}") from None
        self.created: set[str] = set()

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def show(self, name: str) -> str:
        """The path of entry ``name``, for messages."""
        return os.path.join(self.path, printable(name, 300))

    # ------------------------------------------------------------------ entries

    def create(self, name: str, mode: int = 0o644) -> int:
        """A new, empty file ``name`` opened read-write; returns its descriptor (the caller
        closes it). An entry already there is removed first (never followed)."""
        _check_name(name)
        for attempt in (1, 2):
            try:
                fd = os.open(name, _CREATE, mode, dir_fd=self.fd)
            except FileExistsError:
                if attempt == 2:
                    raise MultiFDError(f"cannot create {self.show(name)}: an entry keeps "
                                       "reappearing there") from None
                self.remove(name)
                continue
            except OSError as exc:
                raise MultiFDError(f"cannot create {self.show(name)}: "
                                   f"{exc.strerror or exc}") from None
            self.created.add(name)
            return fd
        raise AssertionError("unreachable")

    def open(self, name: str, mode: str = "wb") -> IO[Any]:
        """``create(name)`` as a file object (``"wb"`` or ``"w"``)."""
        if mode not in ("wb", "w"):
            raise ValueError(f"OutputDir.open: mode {mode!r}, expected 'wb' or 'w'")
        return os.fdopen(self.create(name), mode)

    def write(self, name: str, data: bytes | str, *, sync: bool = True) -> None:
        """Create ``name`` holding ``data``; with ``sync``, durable before it returns."""
        fd = self.create(name)
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while len(view):
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        except OSError as exc:
            raise io_error(exc, self.show(name)) from None
        finally:
            os.close(fd)

    def remove(self, name: str) -> bool:
        """Unlink entry ``name`` if it exists (a link is removed, never followed); a directory
        there is refused. Returns whether something was removed."""
        _check_name(name)
        try:
            st = os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise MultiFDError(f"cannot inspect {self.show(name)}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise MultiFDError(f"{self.show(name)} is a directory; multifd writes a file of "
                               "that name: move it away")
        if name not in self.created:
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "an entry"
            log.warning("removing %s we did not create: %s", kind, self.show(name))
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise MultiFDError(f"cannot remove {self.show(name)}: {exc.strerror}") from None
        self.created.discard(name)
        return True

    def discard(self, name: str) -> None:
        """Remove ``name`` if this run created it (error paths; never raises)."""
        if name in self.created:
            try:
                os.unlink(name, dir_fd=self.fd)
            except OSError:
                pass
            self.created.discard(name)

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` (created by this run) to ``dst`` within the directory; an entry at
        ``dst`` is replaced as a whole (a link there is replaced, not followed)."""
        _check_name(dst)
        if src not in self.created:
            raise MultiFDError(f"refusing to rename {self.show(src)}: not created by this run")
        try:
            os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            raise MultiFDError(f"cannot rename {self.show(src)} to {printable(dst)}: "
                               f"{exc.strerror or exc}") from None
        self.created.discard(src)
        self.created.add(dst)

    def fsync(self) -> None:
        """Make the directory's entries (creations, renames) durable."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error(exc, self.path) from None

    def free_bytes(self) -> int | None:
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_name(name: str) -> None:
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or "/" in name or "\0" in name or name in (".", "..") or len(raw) > NAME_MAX:
        raise MultiFDError(f"bad output file name {printable(name)!r}: expected 1 to "
                           f"{NAME_MAX} bytes, no '/' or NUL")


# --------------------------------------------------------------------------- RAM block files

#: The longest ramblock part of a block's file name, in bytes of UTF-8.
_NAME_PART = 200


def block_file_name(index: int, name: str) -> str:
    """The file of block ``index``: ``NNN-name.ram``, the name made safe: path separators,
    shell specials, control characters and escape sequences become ``_``, and it is cut to
    whole characters of at most 200 bytes (names may be 255 bytes of UTF-8; file names too)."""
    safe = "".join("_" if (not c.isprintable() or c in '/\\:*?"<>| ') else c for c in name)
    base = safe.strip("._") or "block"
    raw = base.encode("utf-8", "surrogateescape")[:_NAME_PART]
    base = raw.decode("utf-8", "ignore")
    return f"{index:03d}-{base}.ram"


class FileOutput:
    """A session's blocks as files ``NNN-name.ram.partial`` in an output directory; ``commit``
    renames them and writes ``manifest.json`` only after the session verified; ``discard``
    removes what a failed session left. Nothing is written through a link (``OutputDir``).

    ``start()`` (called by the first ``allocate``) removes an earlier run's ``manifest.json``:
    a directory being written to is never presented as complete.

    With ``preallocate`` (the default) each file's space is reserved up front
    (``posix_fallocate``), so a full disk is a clear error at the start; ``preallocate=False``
    keeps files sparse (zero pages take no space) and checks the free space for all blocks
    together (``reserve``) before any is created.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, preallocate: bool = True) -> None:
        self.dir = OutputDir(out_dir)
        self.out_dir = self.dir.path
        self.preallocate = preallocate
        self.files: list[tuple[str, str, int, RamBlock]] = []
        #: Other files of the result, written as ``name.partial`` and renamed at ``commit``.
        self.aside: list[str] = []
        self._started = False

    def start(self) -> None:
        """Forget an earlier run's result before anything is written."""
        if not self._started:
            self._started = True
            self.dir.remove(MANIFEST)

    def reserve(self, total: int) -> None:
        """Check that ``total`` bytes of blocks can fit (the sum of all blocks' lengths)."""
        self.start()
        free = self.dir.free_bytes()
        if free is not None and free < total:
            raise MultiFDError(f"not enough space in {self.out_dir}: the ramblocks need up to "
                               f"{total} bytes, {free} are free")

    def allocate(self, name: str, length: int, page_size: int) -> RamBlock:
        self.start()
        fname = block_file_name(len(self.files), name)
        entry = fname + PARTIAL
        fd = self.dir.create(entry)
        try:
            if length and self.preallocate:
                self._fallocate(fd, entry, name, length)
            block = RamBlock.from_fd(fd, name, length, page_size=page_size)
            block.origin = self.dir.show(entry)
        except BaseException:
            os.close(fd)
            self.dir.discard(entry)
            raise
        self.files.append((name, fname, length, block))
        return block

    def _fallocate(self, fd: int, entry: str, name: str, length: int) -> None:
        try:
            os.posix_fallocate(fd, 0, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return
            raise MultiFDError(
                f"cannot reserve {length} bytes for ramblock {printable(name)} in "
                f"{self.dir.show(entry)}: {exc.strerror} ({self.dir.free_bytes()} bytes free)"
            ) from None

    def create_aside(self, name: str) -> int:
        """A descriptor of the new file ``name.partial``, renamed to ``name`` by ``commit``
        (the caller writes it, makes it durable and closes it)."""
        self.start()
        fd = self.dir.create(name + PARTIAL)
        self.aside.append(name)
        return fd

    def write_aside(self, name: str, data: bytes) -> None:
        """``name`` holding ``data`` (durable), renamed into place by ``commit``."""
        self.start()
        self.dir.write(name + PARTIAL, data)
        self.aside.append(name)

    def flush_while(self, work: Callable[[], T]) -> T:
        """Make the blocks durable in a thread while ``work`` runs here (``flush_beside``);
        ``work``'s result once both are done. ``commit(..., flush=False)`` then skips the
        flush."""
        names = {id(block): fname for _, fname, _, block in self.files}
        result, failed = flush_beside([f[3] for f in self.files], work)
        if failed:
            block, exc = failed[0]
            raise io_error(exc, self.dir.show(names[id(block)] + PARTIAL))
        return result

    def commit(self, digests: dict[str, str], extra: dict[str, Any] | None = None,
               *, flush: bool = True, algorithm: str = "sha256") -> str:
        """Make the blocks durable, write the manifest aside, then rename the blocks and the
        manifest into place: a failure before the last rename leaves no ``manifest.json``."""
        blocks = []
        for name, fname, length, block in self.files:
            if flush:
                try:
                    block.flush()
                except OSError as exc:
                    raise io_error(exc, self.dir.show(fname + PARTIAL)) from None
            blocks.append({"name": name, "length": length, "file": fname,
                           algorithm: digests[name]})
        manifest = {"blocks": blocks, "digest": algorithm, **(extra or {})}
        tmp = MANIFEST + PARTIAL
        self.dir.write(tmp, json.dumps(manifest, indent=2) + "\n")
        for fname in [f[1] for f in self.files] + self.aside:
            self.dir.rename(fname + PARTIAL, fname)
        self.dir.rename(tmp, MANIFEST)
        self.dir.fsync()
        return os.path.join(self.out_dir, MANIFEST)

    def close(self) -> None:
        """Release the blocks and the directory (after ``commit``, or to keep the partials)."""
        for *_, block in self.files:
            block.close()
        self.dir.close()

    def discard(self) -> None:
        """Remove what this run created and did not commit, then close."""
        for *_, block in self.files:
            block.close()
        if self.dir.fd >= 0:
            for fname in [f[1] for f in self.files] + self.aside:
                self.dir.discard(fname + PARTIAL)
            self.dir.discard(MANIFEST + PARTIAL)
        self.dir.close()
