"""Physical limits of this machine, measured in the bench's own run.

* bare sockets: the image's non-zero bytes through plain Python sockets over loopback to a
  sink process (``bench_engine.bare_sockets``), 1 and 4 connections;
* memory copy: ``np.copyto`` between two large, already touched buffers;
* first touch: copying into freshly mapped memory, anonymous and a sparse file's mmap
  (the receiver's case: every page it writes is a page fault and, for files, a page-cache
  allocation);
* zero-page scan on one core (``bench_engine.zero_scan_rate``) and the pluggy dispatch cost.

Rates are bytes per second (best of ``repeat``).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.bench_engine import bare_sockets, dispatch_cost, zero_scan_rate
from multifd_core.engine.ram import RamBlock
from multifd_core.wire.pages import zero_mask


def _best(fn: Any, repeat: int) -> float:
    return min(fn() for _ in range(max(1, repeat)))


def memcopy_rate(size: int, repeat: int = 3) -> float:
    src = np.ones(size, dtype=np.uint8)
    dst = np.ones(size, dtype=np.uint8)  # written: no first-touch faults while timing
    np.copyto(dst, src)

    def once() -> float:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    return size / _best(once, repeat)


def first_touch_rate(size: int, kind: str, repeat: int = 3, workdir: str | None = None) -> float:
    """Copy ``size`` bytes into fresh memory: ``anon`` (mmap -1) or ``file`` (sparse file)."""
    src = np.ones(size, dtype=np.uint8)

    def once() -> float:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            if kind == "file":
                fd = os.open(os.path.join(tmp, "touch.img"), os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
                os.close(fd)
            else:
                mm = mmap.mmap(-1, size)
            dst = np.frombuffer(mm, dtype=np.uint8)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            elapsed = time.perf_counter() - t0
            del dst
            mm.close()
        return elapsed

    return size / _best(once, repeat)


def measure_limits(image: str, *, repeat: int = 3, buffer_bytes: int = 256 << 20,
                   workdir: str | None = None) -> dict[str, Any]:
    """All the limits, as a dict of rates (bytes/s) and the context they were measured in."""
    block = RamBlock.from_file(image, "pc.ram")
    try:
        payload = np.ascontiguousarray(
            block.pages[np.flatnonzero(~zero_mask(block.words))]).reshape(-1)
        ram = block.used_length
        scan = max(zero_scan_rate(block) for _ in range(repeat))
    finally:
        block.close()
    data = memoryview(payload)
    sockets = {}
    for conns in (1, 4):
        secs = _best(lambda c=conns: bare_sockets(data, c, "mem"), repeat)
        sockets[conns] = {"seconds": round(secs, 4), "bytes_per_s": round(len(data) / secs),
                          "ram_bytes_per_s": round(ram / secs)}
    nonzero_bytes = len(data)
    return {
        "ram_bytes": ram, "nonzero_bytes": nonzero_bytes,
        "socket_loopback": sockets,
        "memcopy_bytes_per_s": round(memcopy_rate(buffer_bytes, repeat)),
        "first_touch_anon_bytes_per_s": round(first_touch_rate(buffer_bytes, "anon", repeat)),
        "first_touch_file_bytes_per_s": round(first_touch_rate(buffer_bytes, "file", repeat,
                                                               workdir)),
        "zero_scan_bytes_per_s": round(scan),
        "dispatch_us": {k: round(v, 3) for k, v in dispatch_cost().items()},
        "buffer_bytes": buffer_bytes,
    }
