"""Write-back that overlaps a transfer: the disk works while the channels still move pages.

``Writeback`` asks the kernel, every ``interval`` seconds on its own thread, to start writing
the files' dirty pages (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no waiting for the disk;
``fdatasync`` where that call is missing). The final ``fdatasync`` then waits only for the
pages written since the last pass.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from multifd_core.engine.ram import RamBlock

T = TypeVar("T")
log = logging.getLogger("multifd.writeback")

_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk; return without waiting for them."""
    if _sync_file_range is None or _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE):
        os.fdatasync(fd)


class Writeback:
    """``with Writeback(fds):`` keeps the files' write-back going while the block runs.

    ``stop`` does not wait for a pass in progress (``sync_file_range`` can block while the
    disk queue is full; the caller's ``fdatasync`` covers what it was doing): the thread works
    on duplicates of the descriptors, closed by the thread itself, so the caller may close its
    own at once."""

    def __init__(self, fds: Sequence[int], *, interval: float = 0.05) -> None:
        self.fds = [os.dup(fd) for fd in dict.fromkeys(fds)]
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="multifd-writeback",
                                        daemon=True)

    def start(self) -> Writeback:
        if self.fds:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if not self._thread.is_alive() and not self._thread.ident:
            self._close()  # never started

    def _close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Writeback:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                for fd in self.fds:
                    if self._stop.is_set():
                        break
                    start_writeback(fd)
        except OSError:
            pass  # the final fdatasync reports it
        finally:
            self._close()


def flush_beside(blocks: Sequence[RamBlock], work: Callable[[], T]) -> tuple[T, list[
        tuple[RamBlock, OSError]]]:
    """Make ``blocks`` durable on a thread while ``work`` runs here (hashing them, say: the
    flush and the hash both release the GIL). ``work``'s result, and the blocks whose flush
    failed with the error (the flush stops at the first)."""
    failed: list[tuple[RamBlock, OSError]] = []
    took: dict[str, float] = {}
    t0 = time.perf_counter()

    def flush() -> None:
        try:
            for block in blocks:
                try:
                    block.flush()
                except OSError as exc:
                    failed.append((block, exc))
                    return
        finally:
            took["flush"] = time.perf_counter() - t0

    flusher = threading.Thread(target=flush, name="multifd-flush", daemon=True)
    flusher.start()
    try:
        result = work()
        took["work"] = time.perf_counter() - t0
    finally:
        flusher.join()
    log.debug("beside each other: the work took %.3f s, the flush %.3f s",
              took.get("work", float("nan")), took.get("flush", float("nan")))
    return result, failed
