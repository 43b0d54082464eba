"""QEMU mapped-ram files (``migrate file:PATH`` with ``mapped-ram``) on disk.

Reading (``open_mapped_ram``): the main stream, parsed by ``MainStreamReader`` jumping over the
pages regions, the blocks, their bitmaps a slice at a time and their pages. Writing
(``MappedRamWriter``): QEMU's layout, pages moved in chunks on N threads with the zero pages
left out and the bitmap words written per chunk, as ``FILE.partial`` renamed when durable;
``MappedRamOutput`` lets a live capture write one straight from the channels.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.writeback import Writeback
from multifd_core.errors import MultiFDError, io_error
from multifd_core.qemu import mappedram as mr
from multifd_core.qemu import stream as qs
from multifd_core.qemu.chunks import (
    CHUNK_PAGES,
    Chunk,
    OrderedDigest,
    plan_chunks,
    read_exact,
    run_chunks,
    write_all,
)
from multifd_core.session.outdir import PARTIAL, OutputDir
from multifd_core.wire.pages import zero_mask

#: Bytes read from the file per step of the main stream.
_READ = 1 << 16
#: Pages per bitmap slice when walking a whole block (8 KiB of bitmap).
SLICE_PAGES = 1 << 16


T = TypeVar("T")

@dataclass
class MappedRamFile:
    """A mapped-ram file, its stream parsed and checked; ``close`` releases the descriptor."""

    path: str
    fd: int
    size: int
    file_offset: int
    page_size: int
    prologue: qs.Prologue
    section_id: int
    blocks: list[qs.MappedBlock]
    commands: list[qs.Command]
    tail: bytes = field(repr=False)
    vmdesc: bytes = field(repr=False)

    @property
    def switchover_start(self) -> bool:
        return any(c.cmd == qs.CMD_SWITCHOVER_START for c in self.commands)

    @property
    def socket_capabilities(self) -> tuple[str, ...]:
        """The validated capabilities without mapped-ram: what a socket stream carries."""
        return tuple(c for c in self.prologue.capabilities if c != mr.CAPABILITY)

    def what(self, index: int) -> str:
        return f"{self.path} (ramblock {self.blocks[index].info.name})"

    def present(self, index: int, first: int, count: int) -> np.ndarray:
        """Bool per page ``first`` .. ``first + count - 1`` of block ``index``: stored in the
        file (``first`` a multiple of 8)."""
        mb = self.blocks[index]
        buf = bytearray(-(-count // 8))
        read_exact(self.fd, memoryview(buf), mb.header.bitmap_offset + first // 8,
                   f"the bitmap of {self.what(index)}")
        return mr.bitmap_to_mask(buf, count)

    def present_slices(self, index: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first page, page numbers stored) for each slice of block ``index``, in order."""
        n = self.blocks[index].info.length // self.page_size
        for first in range(0, n, SLICE_PAGES):
            mask = self.present(index, first, min(SLICE_PAGES, n - first))
            yield first, first + np.flatnonzero(mask).astype(np.int64)

    def map_block(self, index: int) -> RamBlock:
        """Block ``index`` over its pages region (read-only; absent pages may hold stale data
        or holes: use ``present``)."""
        mb = self.blocks[index]
        return RamBlock.map_region(self.fd, mb.info.name, mb.header.pages_offset,
                                   mb.info.length, page_size=self.page_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_mapped_ram(path: str | os.PathLike[str], *, file_offset: int = 0,
                    page_size: int = 4096) -> MappedRamFile:
    """Open and parse ``path``; every header is checked against the file before anything
    trusts it. Errors name the field (``MappedRamError``, ``StreamError``)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MultiFDError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return _parse(path, fd, file_offset, page_size)
    except (mr.MappedRamError, qs.StreamError) as exc:
        os.close(fd)
        text = str(exc)
        raise mr.MappedRamError(text if text.startswith(path) else f"{path}: {text}") from None
    except BaseException:
        os.close(fd)
        raise


def _parse(path: str, fd: int, file_offset: int, page_size: int) -> MappedRamFile:
    size = os.fstat(fd).st_size
    if file_offset < 0 or file_offset >= size:
        raise mr.MappedRamError(f"{path}: the stream offset is outside the file",
                                field="offset", received=f"{file_offset:#x}",
                                expected=f"< {size:#x} (the file's size)")
    reader = qs.MainStreamReader(page_size=page_size, file_offset=file_offset, file_size=size)
    tail = bytearray()
    while True:
        pos = file_offset + reader.feed_offset
        data = os.pread(fd, _READ, pos) if pos < size else b""
        if not data:
            break
        reader.feed(data)
        for ev in reader.events():
            if isinstance(ev, qs.TailData):
                tail += ev.data
            elif isinstance(ev, qs.Prologue) and not reader.mapped_ram:
                caps = ", ".join(ev.capabilities) or "none"
                raise mr.MappedRamError(
                    f"{path}: not a mapped-ram file (saved without the mapped-ram capability)",
                    field="configuration/capabilities", received=caps,
                    expected=mr.CAPABILITY)
    try:
        reader.close()
        device, vmdesc = qs.split_tail(bytes(tail))
    except qs.StreamError as exc:
        raise mr.MappedRamError(f"truncated or damaged stream: {exc}") from None
    if vmdesc is None:
        raise mr.MappedRamError(f"{path}: the stream ends without the vmdesc after the device "
                                "state (file cut short?)", field="vmdesc", received="none",
                                expected="06, be32 length, JSON")
    try:
        json.loads(vmdesc)
    except ValueError as exc:
        raise mr.MappedRamError(f"{path}: the vmdesc JSON does not parse: {exc}") from None
    assert reader.prologue is not None and reader.ram_section_id is not None
    return MappedRamFile(path, fd, size, file_offset, page_size, reader.prologue,
                         reader.ram_section_id, list(reader.mapped_blocks),
                         list(reader.commands), bytes(tail), vmdesc)


def sync_mode(machine: str) -> str:
    """How a socket migration of ``machine`` syncs its channels: machine types before 8.1 flush
    after each RAM section (no MULTIFD_FLUSH records), later ones once per round. A mapped-ram
    file carries no FLUSH either way, so the machine type decides."""
    m = re.search(r"-(\d+)\.(\d+)$", machine)
    if m and (int(m[1]), int(m[2])) < (8, 1):
        return "per-section"
    return "per-round"


# --------------------------------------------------------------------------- writing


@dataclass
class CopyStats:
    """What a page copy did: pages stored in the source, non-zero pages written, zero pages
    left out, bytes written, wall time."""

    seconds: float = 0.0
    present_pages: int = 0
    written_pages: int = 0
    zero_pages: int = 0
    bytes_written: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, present: int, written: int, zero: int, nbytes: int) -> None:
        """Count one chunk (called from the copy threads)."""
        with self._lock:
            self.present_pages += present
            self.written_pages += written
            self.zero_pages += zero
            self.bytes_written += nbytes

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(self).items()
                if not k.startswith("_")}


def nonzero_runs(span: memoryview, n: int, ps: int,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, mask) of the runs of non-zero pages among the ``n`` pages of ``span``
    (restricted to ``keep`` when given)."""
    words = np.frombuffer(span, dtype=np.uint64, count=n * ps // 8).reshape(n, ps // 8)
    mask = ~zero_mask(words)
    if keep is not None:
        mask &= keep
    starts, ends = mr.page_runs(mask)
    return starts, ends, mask



class MappedRamWriter:
    """A mapped-ram file being written as ``FILE.partial``: the stream pieces, the pages of
    each block in its region, the bitmaps; ``commit`` makes it durable and renames it."""

    def __init__(self, out_file: str | os.PathLike[str], prologue: bytes, section_id: int,
                 infos: list[qs.BlockInfo], *, page_size: int, file_offset: int = 0) -> None:
        """Lay the file out (QEMU's layout) and write the stream up to the last block's
        header; ``write_trailer`` adds the rest of the stream after the last pages region."""
        self.path = os.fspath(out_file)
        self.page_size = page_size
        self.infos = list(infos)
        self.layout = qs.mapped_ram_layout(prologue, section_id, self.infos,
                                           page_size=page_size, file_offset=file_offset)
        self.size = self.layout.trailer_offset
        self._out = _PartialFile(self.path)
        self.fd = self._out.fd
        try:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as exc:
                raise io_error(exc, self._out.partial) from None
            for offset, data in self.layout.pieces:
                write_all(self.fd, data, offset, self._out.partial)
        except BaseException:
            self._out.discard()
            raise

    def write_trailer(self, trailer: bytes) -> None:
        """The stream after the last pages region: EOS, footer, RAM END, device tail."""
        write_all(self.fd, trailer, self.layout.trailer_offset, self._out.partial)
        self.size = self.layout.trailer_offset + len(trailer)

    def region(self, index: int) -> tuple[int, int]:
        """(pages offset, length) of block ``index``."""
        return self.layout.headers[index].pages_offset, self.infos[index].length

    def copy_from(self, fds: list[int], *, threads: int,
                  expect: list[tuple[str, str]] | None = None) -> CopyStats:
        """Write the non-zero pages of each block read from ``fds[i]`` (whole block files) and
        the bitmaps; with ``expect`` ((algorithm, hex) per block), check each block's digest
        read alongside."""
        ps = self.page_size
        digest = None
        if expect is not None:
            digest = OrderedDigest([(fd, 0, b.length) for fd, b in zip(fds, self.infos,
                                                                       strict=True)],
                                   chunk_bytes=CHUNK_PAGES * ps,
                                   what=lambda i: f"ramblock {self.infos[i].name}",
                                   algorithm=expect[0][0] if expect else DEFAULT_DIGEST)
            digest.all_done()
            digest.start()
        stats = CopyStats()

        def work(ch: Chunk, buf: memoryview) -> None:
            span = buf[: ch.count * ps]
            read_exact(fds[ch.block], span, ch.first * ps,
                       f"the file of ramblock {self.infos[ch.block].name}")
            self._store(ch, span, stats)

        try:
            with Writeback([self.fd]):
                run_chunks(plan_chunks([b.length // ps for b in self.infos]), work,
                           threads=threads, buffer_bytes=CHUNK_PAGES * ps)
                digests = digest.result() if digest is not None else []
        except BaseException:
            if digest is not None:
                digest.stop()
            raise
        if digest is not None and expect is not None:
            for info, got, (algorithm, want) in zip(self.infos, digests, expect, strict=True):
                if got != want:
                    raise MultiFDError(f"ramblock {info.name}: {algorithm} {got[:16]}... differs "
                                       f"from the manifest's {want[:16]}... (capture damaged)")
        return stats

    def scan_regions(self, *, threads: int) -> CopyStats:
        """Write the bitmaps of pages already in place in the regions (a capture that received
        straight into them): set for each non-zero page."""
        ps = self.page_size
        stats = CopyStats()

        def work(ch: Chunk, buf: memoryview) -> None:
            span = buf[: ch.count * ps]
            base, _ = self.region(ch.block)
            read_exact(self.fd, span, base + ch.first * ps, self._out.partial)
            self._store(ch, span, stats, write_pages=False)

        run_chunks(plan_chunks([b.length // ps for b in self.infos]), work,
                   threads=threads, buffer_bytes=CHUNK_PAGES * ps)
        return stats

    def _store(self, ch: Chunk, span: memoryview, stats: CopyStats, *,
               write_pages: bool = True) -> None:
        ps = self.page_size
        starts, ends, mask = nonzero_runs(span, ch.count, ps)
        base, _ = self.region(ch.block)
        if write_pages:
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                write_all(self.fd, span[s * ps : e * ps], base + (ch.first + s) * ps,
                          self._out.partial)
        header = self.layout.headers[ch.block]
        write_all(self.fd, mr.mask_to_bitmap(mask), header.bitmap_offset + ch.first // 8,
                  self._out.partial)
        n = int(mask.sum())
        stats.add(n, n if write_pages else 0, ch.count - n, n * ps if write_pages else 0)

    def commit(self) -> None:
        self._out.commit()

    def discard(self) -> None:
        self._out.discard()



class _PartialFile:
    """``PATH.partial`` created in ``PATH``'s directory (through ``OutputDir``: never through
    a link), renamed to ``PATH`` by ``commit`` once durable."""

    def __init__(self, path: str) -> None:
        parent, self.name = os.path.split(os.path.abspath(path))
        self.dir = OutputDir(parent)
        self.partial = os.path.join(parent, self.name + PARTIAL)
        try:
            self.fd = self.dir.create(self.name + PARTIAL)
        except BaseException:
            self.dir.close()
            raise

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error(exc, self.partial) from None
        os.close(self.fd)
        self.fd = -1
        self.dir.rename(self.name + PARTIAL, self.name)
        self.dir.fsync()
        self.dir.close()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dir.fd >= 0:
            self.dir.discard(self.name + PARTIAL)
            self.dir.close()


class MappedRamOutput:
    """The output of ``qemu capture --mapped-ram FILE``: the calls a capture makes on
    ``FileOutput``, answered with a mapped-ram file. ``begin`` (at the block list) lays the
    file out; each block is then a writable window on its pages region, so the channels write
    the pages straight to their places; ``commit`` writes the bitmaps (a scan of the regions:
    set for each non-zero page), the rest of the stream and renames the file into place."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 4) -> None:
        self.path = os.fspath(path)
        self.threads = threads
        self.writer: MappedRamWriter | None = None
        self.blocks: list[RamBlock] = []
        self._asides: dict[str, int] = {}

    def start(self) -> None:
        """Nothing to forget: the file appears only at ``commit``."""

    def begin(self, prologue: qs.Prologue, section_id: int,
              blocks: tuple[qs.BlockInfo, ...], page_size: int) -> None:
        caps = prologue.capabilities + (() if mr.CAPABILITY in prologue.capabilities
                                        else (mr.CAPABILITY,))
        self.writer = MappedRamWriter(self.path, qs.encode_prologue(prologue, caps), section_id,
                                      list(blocks), page_size=page_size)

    def reserve(self, total: int) -> None:
        assert self.writer is not None, "begin() first"
        free = self.writer._out.dir.free_bytes()
        if free is not None and free < total:
            raise MultiFDError(f"not enough space for {self.path}: the ramblocks need up to "
                               f"{total} bytes, {free} are free")

    def allocate(self, name: str, length: int, page_size: int) -> RamBlock:
        w = self.writer
        assert w is not None, "begin() first"
        i = len(self.blocks)
        if i >= len(w.infos) or w.infos[i].name != name or w.infos[i].length != length:
            raise MultiFDError(f"ramblock {name} was not in the block list laid out")
        offset, _ = w.region(i)
        block = RamBlock.map_region(w.fd, name, offset, length, page_size=page_size,
                                    writable=True)
        block.origin = f"{w._out.partial} (ramblock {name})"
        self.blocks.append(block)
        return block

    def create_aside(self, name: str) -> int:
        """An anonymous file for a side stream (the device tail); read back at ``commit``."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._asides[name] = os.dup(fd)
        return fd

    def write_aside(self, name: str, data: bytes) -> None:
        """The prefix and the vmdesc are in the stream already."""

    def flush_while(self, work: Callable[[], T]) -> T:
        """``work()``: the file is made durable in ``commit``, after its bitmaps."""
        return work()

    def commit(self, digests: dict[str, str], extra: dict[str, Any] | None = None,
               **_: Any) -> str:
        w = self.writer
        assert w is not None and extra is not None
        tail_fd = self._asides["tail.bin"]
        tail = os.pread(tail_fd, os.fstat(tail_fd).st_size, 0)
        w.write_trailer(qs.mapped_ram_trailer(int(extra["ram_section_id"]), tail,
                                              switchover_start=bool(extra["switchover_start"])))
        with Writeback([w.fd]):
            w.scan_regions(threads=self.threads)
        w.commit()
        return self.path

    def close(self) -> None:
        for b in self.blocks:
            b.close()
        for fd in self._asides.values():
            os.close(fd)
        self._asides.clear()

    def discard(self) -> None:
        self.close()
        if self.writer is not None:
            self.writer.discard()
