"""Host-backed free memory before each timed step of a benchmark.

A VM that reports its free pages to the host (virtio-balloon free page reporting, as on the
project's CI machine: ``/sys/module/page_reporting``) hands every freed page back. The next
touch of such a page then costs a fault in the host too: on that machine, touching 1 GiB of
fresh memory took 0.4 s right after other memory had been freed and 3.4 s after 5 idle
seconds. QEMU->QEMU none x4 of the bench's guest took 645-1916 ms after 6 idle seconds and
263-603 ms right after 2 GiB had been touched and freed. So without this, a step's figure
follows how long the machine was idle before it, not the code.

``warm_memory`` touches and frees fresh memory right before a step, so the pages that step
allocates (a QEMU destination's RAM, a receiver's page cache) come back host-backed, for
QEMU's steps and ours alike. It asks for transparent huge pages, as QEMU does for guest RAM:
the 2 MiB blocks those take are the ones the guest reports to its host, and 4 KiB pages
would be served from warm leftovers (1.4 us per page, against 4-7 us for huge pages right
then). It returns what the touch cost per 4 KiB page: how cold the machine was.
"""

from __future__ import annotations

import mmap
import time

import numpy as np

#: GiB touched before each timed step by default (about what a 1 GiB guest's step allocates).
WARM_GIB = 2.0
PAGE = 4096


def warm_memory(gib: float) -> float | None:
    """Touch ``gib`` GiB of new anonymous memory, one byte per page, and free it; the
    microseconds that took per 4 KiB page, or None when ``gib`` is 0."""
    size = int(gib * (1 << 30)) // PAGE * PAGE
    if size <= 0:
        return None
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            area.madvise(mmap.MADV_HUGEPAGE)
        view = np.frombuffer(area, dtype=np.uint8)
        t0 = time.perf_counter()
        view[::PAGE] = 1
        took = time.perf_counter() - t0
        del view
    finally:
        area.close()
    return round(took / (size // PAGE) * 1e6, 2)


def warm_range(values: list[float | None]) -> list[float] | None:
    """[lowest, highest] cost per page of the warm-ups (None: no warm-up ran)."""
    got = [v for v in values if v is not None]
    return [min(got), max(got)] if got else None


def warm_line(gib: float, span: list[float] | None) -> str:
    """What the report says about the warm-ups."""
    if not span:
        return "no warm-up before the timed steps (--warm-gib 0)"
    return (f"each timed step ran right after {gib:g} GiB of fresh memory was touched and freed, "
            f"at {span[0]:.1f}-{span[1]:.1f} us per page (benchmarks/warm.py)")
