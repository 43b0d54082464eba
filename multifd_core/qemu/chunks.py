"""Chunked, parallel page work on files: N threads with one buffer each take chunks of pages in
order (``pread``/``pwrite`` and numpy release the GIL), and a digest that follows the chunks in
order as they complete. Memory: one chunk buffer per thread, whatever the size of the RAM.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.digest import hasher
from multifd_core.errors import MultiFDError, io_error

#: Pages per chunk: 4 MiB of 4 KiB pages, a multiple of 64 so a chunk owns whole bitmap words.
CHUNK_PAGES = 1024


@dataclass(frozen=True)
class Chunk:
    """Pages ``first`` to ``first + count - 1`` of block ``block`` (an index); ``seq`` is the
    chunk's number within its block."""

    block: int
    seq: int
    first: int
    count: int


def plan_chunks(n_pages: Sequence[int], chunk_pages: int = CHUNK_PAGES) -> Iterator[Chunk]:
    for b, n in enumerate(n_pages):
        for seq, first in enumerate(range(0, n, chunk_pages)):
            yield Chunk(b, seq, first, min(chunk_pages, n - first))


def run_chunks(chunks: Iterable[Chunk], work: Callable[[Chunk, memoryview], None], *,
               threads: int, buffer_bytes: int) -> None:
    """Run ``work(chunk, buffer)`` for every chunk on ``threads`` threads, each with its own
    ``buffer_bytes`` buffer. The first error stops the others and is raised here."""
    it = iter(chunks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        buf = memoryview(bytearray(buffer_bytes))
        while not errors:
            with lock:
                chunk = next(it, None)
            if chunk is None:
                return
            try:
                work(chunk, buf)
            except BaseException as exc:
                errors.append(exc)
                return

    pool = [threading.Thread(target=worker, name=f"mapped-ram-{i}", daemon=True)
            for i in range(max(1, threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


class OrderedDigest:
    """Digests (``engine.digest``) of byte ranges of files, read back in order as the chunks
    covering them are marked done (``done``), on its own thread (``start``/``result``)."""

    def __init__(self, regions: Sequence[tuple[int, int, int]], *, chunk_bytes: int,
                 what: Callable[[int], str], algorithm: str = DEFAULT_DIGEST) -> None:
        """``regions``: (fd, file offset, length) per block; chunks are ``chunk_bytes`` long."""
        self.algorithm = algorithm
        self.regions = regions
        self.chunk_bytes = chunk_bytes
        self.what = what
        self._done = [np.zeros(-(-length // chunk_bytes), dtype=bool)
                      for _, _, length in regions]
        #: Chunks known to hold only zeros (nothing written): hashed without reading them.
        self._zero = [np.zeros(len(d), dtype=bool) for d in self._done]
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._digests: list[str] = []
        self._thread = threading.Thread(target=self._run, name="mapped-ram-digest", daemon=True)

    def start(self) -> OrderedDigest:
        self._thread.start()
        return self

    def done(self, chunk: Chunk, *, zero: bool = False) -> None:
        """Chunk ``chunk`` is in place (``zero``: nothing was written in it)."""
        with self._cond:
            self._done[chunk.block][chunk.seq] = True
            self._zero[chunk.block][chunk.seq] = zero
            self._cond.notify()

    def all_done(self) -> None:
        with self._cond:
            for d in self._done:
                d[:] = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def result(self) -> list[str]:
        """The digests, one per region, once every chunk is done."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if len(self._digests) != len(self.regions):
            raise MultiFDError("the digest stopped before the end")
        return self._digests

    def _run(self) -> None:
        try:
            buf = memoryview(bytearray(self.chunk_bytes))
            zeros = memoryview(bytes(self.chunk_bytes))
            for b, (fd, base, length) in enumerate(self.regions):
                h = hasher(self.algorithm, threads=False)
                for seq in range(len(self._done[b])):
                    with self._cond:
                        while not self._done[b][seq] and not self._stop:
                            self._cond.wait()
                        if self._stop:
                            return
                    start = seq * self.chunk_bytes
                    n = min(self.chunk_bytes, length - start)
                    if self._zero[b][seq]:
                        h.update(zeros[:n])
                        continue
                    read_exact(fd, buf[:n], base + start, self.what(b))
                    h.update(buf[:n])
                self._digests.append(h.hexdigest())
        except BaseException as exc:
            self._error = exc


def read_exact(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill ``buf`` from ``offset`` of ``fd``; a short file is an error naming ``what``."""
    got = 0
    while got < len(buf):
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as exc:
            raise MultiFDError(f"cannot read {what}: {exc.strerror or exc}") from None
        if n == 0:
            raise MultiFDError(f"{what} ends early: {offset + got:#x} is past its end "
                               f"({len(buf) - got} bytes missing)")
        got += n


def write_all(fd: int, data: memoryview | bytes, offset: int, what: str) -> None:
    view = memoryview(data)
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise io_error(exc, what) from None
        view, offset = view[n:], offset + n
