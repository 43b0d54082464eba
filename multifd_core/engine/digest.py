"""Block digests: what a receiver compares with the sender's, what a manifest records.

``blake3`` (the default) is the BLAKE3 hash of a block's bytes, 32 bytes as 64 hex digits:
exactly what ``b3sum FILE`` prints for a block's file, so anyone can check a manifest with a
standard tool. It hashes several GiB/s per core and uses every core on a large block.
``sha256`` (``sha256sum FILE``) is what the first release used; it is still accepted from a
peer or read from an older manifest.
"""

from __future__ import annotations

import hashlib
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


def manifest_digest(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(algorithm, hex) of a manifest's block entry, whichever algorithm it records."""
    for algorithm in ALGORITHMS:
        value = entry.get(algorithm)
        if isinstance(value, str):
            return algorithm, value
    raise MultiFDError(f"manifest entry {str(entry.get('name'))[:60]!r} has no digest (expected "
                       f"one of {', '.join(ALGORITHMS)})")
