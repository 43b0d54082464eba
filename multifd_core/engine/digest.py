"""Block digests: what a receiver compares with the sender's, what a manifest records.

``blake3`` (the default) is the BLAKE3 hash of a block's bytes, 32 bytes as 64 hex digits:
exactly what ``b3sum FILE`` prints for a block's file, so anyone can check a manifest with a
standard tool. It hashes several GiB/s per core and uses every core on a large block.
``sha256`` (``sha256sum FILE``) is what the first release used; it is still accepted from a
peer or read from an older manifest.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping
from typing import Any

from multifd_core.errors import MultiFDError

try:
    import blake3 as _blake3
except ImportError:  # a core dependency; its absence is a broken install
    _blake3 = None

ALGORITHMS = ("blake3", "sha256")
DEFAULT = "blake3" if _blake3 is not None else "sha256"
#: Hash in steps of this many bytes (bounded work per call, views not copies).
STEP = 256 << 20


def hasher(algorithm: str = DEFAULT, *, threads: bool = True) -> Any:
    """A new hash object (``update``, ``hexdigest``); ``threads``: BLAKE3 may use every core
    for each large update (it releases the GIL)."""
    if algorithm == "blake3":
        if _blake3 is None:
            raise MultiFDError("digest blake3 needs the python package blake3: pip install "
                               "blake3")
        return _blake3.blake3(max_threads=_blake3.blake3.AUTO if threads else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise MultiFDError(f"unknown digest {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")


def digest_of(buffer: Any, algorithm: str = DEFAULT, *, threads: bool = True) -> str:
    """The hex digest of ``buffer`` (anything with the buffer protocol), hashed in steps."""
    view = memoryview(buffer).cast("B")
    h = hasher(algorithm, threads=threads)
    for start in range(0, len(view), STEP):
        h.update(view[start : start + STEP])
    return h.hexdigest()


#: Fed to the hash for a file's holes (read as zeros without touching the file's pages).
_ZEROS = memoryview(bytes(16 << 20))


#: The window of the hole lookup: holes shorter than this are read like data.
MIN_HOLE = 4 << 20


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """Byte ranges of the ``length`` bytes at ``offset`` in file ``fd`` that may hold data,
    relative to ``offset``; the rest is holes (which read as zeros). Looked up per
    ``MIN_HOLE`` window with ``SEEK_DATA`` (one call per window that holds data, one per run
    of hole windows), so a hole shorter than a window counts as data. The whole range where
    the file system cannot tell."""
    out: list[tuple[int, int]] = []
    end = offset + length
    pos, start = offset, None  # window start; where the current data range began
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data from pos on
                return [(0, length)]
            data = end
        if data >= min(pos + MIN_HOLE, end):  # [pos, pos + MIN_HOLE) is a hole
            if start is not None:
                out.append((start - offset, pos - offset))
                start = None
            pos = max(pos + MIN_HOLE, min(data, end))
        else:
            if start is None:
                start = data
            pos += MIN_HOLE
    if start is not None:
        out.append((start - offset, length))
    return out


def digest_of_file(buffer: Any, fd: int, offset: int = 0, algorithm: str = DEFAULT, *,
                   threads: bool = True) -> str:
    """``digest_of(buffer)`` for a buffer that maps ``fd`` from ``offset``: the same digest,
    but holes are hashed from a zero buffer instead of being read through the mapping (reading
    a hole makes the kernel allocate and zero a page-cache page for it)."""
    view = memoryview(buffer).cast("B")
    return digest_of_extents(view, data_extents(fd, offset, len(view)), algorithm,
                             threads=threads)


def digest_of_extents(buffer: Any, extents: list[tuple[int, int]], algorithm: str = DEFAULT,
                      *, threads: bool = True) -> str:
    """``digest_of(buffer)`` where only the byte ranges ``extents`` (ascending) may hold data:
    the rest is hashed as zeros without being read."""
    view = memoryview(buffer).cast("B")
    h = hasher(algorithm, threads=threads)
    done = 0
    for start, end in [*extents, (len(view), len(view))]:
        for zero in range(done, start, len(_ZEROS)):
            h.update(_ZEROS[: min(len(_ZEROS), start - zero)])
        for step in range(start, end, STEP):
            h.update(view[step : min(step + STEP, end)])
        done = end
    return h.hexdigest()


def manifest_digest(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(algorithm, hex) of a manifest's block entry, whichever algorithm it records."""
    for algorithm in ALGORITHMS:
        value = entry.get(algorithm)
        if isinstance(value, str):
            return algorithm, value
    raise MultiFDError(f"manifest entry {str(entry.get('name'))[:60]!r} has no digest (expected "
                       f"one of {', '.join(ALGORITHMS)})")
