"""Block digests: what the sender and the receiver compare before a session counts."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from multifd_core.engine.ram import RamBlock


def digests(blocks: Iterable[RamBlock]) -> dict[str, str]:
    """sha256 of every block, hashed in parallel threads (hashlib releases the GIL)."""
    blocks = list(blocks)
    out: dict[str, str] = {}

    def work(b: RamBlock) -> None:
        out[b.name] = b.sha256()

    threads = [threading.Thread(target=work, args=(b,)) for b in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
