"""Block digests: what the sender and the receiver compare before a session counts."""

from __future__ import annotations

from collections.abc import Iterable

from multifd_core.engine.digest import DEFAULT
from multifd_core.engine.ram import RamBlock


def digests(blocks: Iterable[RamBlock], algorithm: str = DEFAULT, *,
            threads: bool = True) -> dict[str, str]:
    """Every block's digest (``engine.digest``); BLAKE3 hashes each block on all cores unless
    ``threads`` is false (hashing beside a transfer)."""
    return {b.name: b.digest(algorithm, threads=threads) for b in blocks}
