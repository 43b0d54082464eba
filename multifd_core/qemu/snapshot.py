"""QEMU snapshot files: a mapped-ram file to a capture directory (``import_file``), a capture
directory to a mapped-ram file (``export_capture``), and a mapped-ram file as a replay source
(``load_file_capture``).

Both directions move pages in chunks on N threads (``chunks.run_chunks``: ``pread``/``pwrite``
and a numpy zero-page scan per chunk), so memory is a few chunk buffers whatever the RAM size.
Zero pages are left unwritten, as QEMU leaves them: their bit in the bitmap stays clear.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.errors import MultiFDError, io_error
from multifd_core.outdir import PARTIAL, FileOutput, OutputDir
from multifd_core.pages import zero_mask
from multifd_core.qemu import mappedram as mr
from multifd_core.qemu import stream as qs
from multifd_core.qemu.capture import MANIFEST_FORMAT, PREFIX_FILE, TAIL_FILE, VMDESC_FILE
from multifd_core.qemu.chunks import (
    CHUNK_PAGES,
    Chunk,
    OrderedDigest,
    Writeback,
    plan_chunks,
    read_exact,
    run_chunks,
    write_all,
)
from multifd_core.qemu.mappedfile import MappedRamFile, open_mapped_ram, sync_mode
from multifd_core.qemu.replay import Capture, load_capture
from multifd_core.wire import format_uuid

DEFAULT_THREADS = 4


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


def _nonzero_runs(span: memoryview, n: int, ps: int,
                  keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, mask) of the runs of non-zero pages among the ``n`` pages of ``span``
    (restricted to ``keep`` when given)."""
    words = np.frombuffer(span, dtype=np.uint64, count=n * ps // 8).reshape(n, ps // 8)
    mask = ~zero_mask(words)
    if keep is not None:
        mask &= keep
    starts, ends = mr.page_runs(mask)
    return starts, ends, mask


# --------------------------------------------------------------------------- import


def import_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                threads: int = DEFAULT_THREADS, file_offset: int = 0, page_size: int = 4096,
                preallocate: bool = False) -> dict[str, Any]:
    """Read the mapped-ram file ``path`` into the capture directory ``out_dir`` (the layout
    and manifest of ``qemu capture``). Each block's sha256 is computed by reading back what was
    written, in order, while the copy runs; the manifest is written last.

    The block files stay sparse by default (only stored non-zero pages take space, as in the
    file; pages are written with ``pwrite``, so a full disk is an error, not a SIGBUS)."""
    t0 = time.perf_counter()
    src = open_mapped_ram(path, file_offset=file_offset, page_size=page_size)
    output = FileOutput(out_dir, preallocate=preallocate)
    ok = False
    try:
        # Sparse block files: at most what the file stores.
        output.reserve(min(sum(mb.info.length for mb in src.blocks), src.size))
        blocks = [output.allocate(mb.info.name, mb.info.length, page_size)
                  for mb in src.blocks]
        stats = CopyStats()
        digest = OrderedDigest([(b.fd, 0, b.used_length) for b in blocks],
                               chunk_bytes=CHUNK_PAGES * page_size,
                               what=lambda i: f"{out_dir}/{output.files[i][1]}").start()
        try:
            with Writeback([b.fd for b in blocks]):
                run_chunks(plan_chunks([b.n_pages for b in blocks]),
                           lambda ch, buf: _import_chunk(src, blocks, ch, buf, stats, digest),
                           threads=threads, buffer_bytes=CHUNK_PAGES * page_size)
                digests = digest.result()
        except BaseException:
            digest.stop()
            raise
        stats.seconds = time.perf_counter() - t0
        manifest = _commit_import(src, output, blocks, digests, stats)
        ok = True
        return manifest
    finally:
        src.close()
        if ok:
            output.close()
        else:
            output.discard()


def _import_chunk(src: MappedRamFile, blocks: list[Any], ch: Chunk, buf: memoryview,
                  stats: CopyStats, digest: OrderedDigest) -> None:
    """Copy the stored, non-zero pages of one chunk from the file into the block's file."""
    ps = src.page_size
    present = src.present(ch.block, ch.first, ch.count)
    idx = np.flatnonzero(present)
    written = 0
    if len(idx):
        a, b = int(idx[0]), int(idx[-1]) + 1
        span = buf[: (b - a) * ps]
        pages_offset = src.blocks[ch.block].header.pages_offset
        read_exact(src.fd, span, pages_offset + (ch.first + a) * ps,
                   f"the pages of {src.what(ch.block)}")
        starts, ends, mask = _nonzero_runs(span, b - a, ps, present[a:b])
        fd = blocks[ch.block].fd
        base = (ch.first + a) * ps
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            write_all(fd, span[s * ps : e * ps], base + s * ps, blocks[ch.block].name)
        written = int(mask.sum())
        stats.add(len(idx), written, len(idx) - written, written * ps)
    digest.done(ch, zero=not written)


def _commit_import(src: MappedRamFile, output: FileOutput, blocks: list[Any],
                   digests: list[str], stats: CopyStats) -> dict[str, Any]:
    prefix = qs.encode_prologue(src.prologue, src.socket_capabilities)
    output.write_aside(PREFIX_FILE, prefix)
    output.write_aside(TAIL_FILE, src.tail)
    output.write_aside(VMDESC_FILE, src.vmdesc)
    pro = src.prologue
    extra = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "machine": pro.machine,
        "uuid": format_uuid(pro.uuid or bytes(16)),
        "configuration": {"capabilities": list(src.socket_capabilities),
                          "uuid": format_uuid(pro.uuid) if pro.uuid else None,
                          "target_page_bits": pro.target_page_bits},
        "method": None,
        "channels": None,
        "page_size": src.page_size,
        "sync_mode": sync_mode(pro.machine),
        "return_path": False,
        "switchover_start": src.switchover_start,
        "zero_page_detection": "mapped-ram",
        "ram_section_id": src.section_id,
        "commands": [c.name for c in src.commands],
        "prefix": {"file": PREFIX_FILE, "length": len(prefix),
                   "sha256": hashlib.sha256(prefix).hexdigest()},
        "tail": {"file": TAIL_FILE, "offset": None, "length": len(src.tail),
                 "sha256": hashlib.sha256(src.tail).hexdigest(),
                 "device_bytes": len(src.tail) - len(src.vmdesc) - 5},
        "vmdesc": {"file": VMDESC_FILE, "length": len(src.vmdesc)},
        "source": {"kind": "mapped-ram", "file": os.path.abspath(src.path),
                   "file_offset": src.file_offset, "size": src.size,
                   "capabilities": list(pro.capabilities),
                   "blocks": [{"name": mb.info.name, "header_offset": mb.header_offset,
                               "bitmap_offset": mb.header.bitmap_offset,
                               "pages_offset": mb.header.pages_offset}
                              for mb in src.blocks]},
        "statistics": stats.as_dict(),
    }
    # The writeback thread synced the blocks while they were copied; commit's fsync finishes.
    output.commit({b.name: d for b, d in zip(blocks, digests, strict=True)}, extra)
    return {"blocks": [{"name": b.name, "length": b.used_length, "file": f[1], "sha256": d}
                       for b, f, d in zip(blocks, output.files, digests, strict=True)], **extra}


# --------------------------------------------------------------------------- export


def export_capture(capture_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *,
                   threads: int = DEFAULT_THREADS, file_offset: int = 0,
                   verify: bool = True) -> dict[str, Any]:
    """Write the capture in ``capture_dir`` as a mapped-ram file QEMU restores with
    ``migrate-incoming file:OUT_FILE`` (``,offset=N`` with ``file_offset``). With ``verify``
    each block's sha256 is checked against the manifest while it is copied; the file is
    renamed into place only when everything matched and is on disk."""
    t0 = time.perf_counter()
    cap = load_capture(capture_dir, verify=False)
    fds: list[int] = []
    try:
        for entry in cap.manifest["blocks"]:
            path = Path(capture_dir) / entry["file"]
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise MultiFDError(f"ramblock {entry['name']}: cannot read {path}: "
                                   f"{exc.strerror}") from None
        writer = MappedRamWriter.for_capture(cap, out_file, file_offset=file_offset)
        try:
            stats = writer.copy_from(fds, threads=threads,
                                     expect=[b["sha256"] for b in cap.manifest["blocks"]]
                                     if verify else None)
            writer.commit()
        except BaseException:
            writer.discard()
            raise
    finally:
        for fd in fds:
            os.close(fd)
        cap.close()
    stats.seconds = time.perf_counter() - t0
    return {"file": os.fspath(out_file), "size": writer.size, "file_offset": file_offset,
            "blocks": [{"name": b.name, "length": b.length, **h.__dict__}
                       for b, h in zip(writer.infos, writer.layout.headers, strict=True)],
            "verified": verify, "statistics": stats.as_dict()}


class MappedRamWriter:
    """A mapped-ram file being written as ``FILE.partial``: the stream pieces, the pages of
    each block in its region, the bitmaps; ``commit`` makes it durable and renames it."""

    def __init__(self, out_file: str | os.PathLike[str], prologue: bytes, section_id: int,
                 infos: list[qs.BlockInfo], trailer: bytes, *, page_size: int,
                 file_offset: int = 0) -> None:
        self.path = os.fspath(out_file)
        self.page_size = page_size
        self.infos = infos
        self.layout = qs.mapped_ram_layout(prologue, section_id, infos, page_size=page_size,
                                           file_offset=file_offset)
        self.size = self.layout.trailer_offset + len(trailer)
        self._out = _PartialFile(self.path)
        self.fd = self._out.fd
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise MultiFDError(f"cannot size {self._out.partial}: {exc.strerror}") from None
        for offset, data in [*self.layout.pieces, (self.layout.trailer_offset, trailer)]:
            write_all(self.fd, data, offset, self._out.partial)

    @classmethod
    def for_capture(cls, cap: Capture, out_file: str | os.PathLike[str], *,
                    file_offset: int = 0) -> MappedRamWriter:
        try:
            pro = qs.parse_prologue(cap.prefix)
        except qs.StreamError as exc:
            raise MultiFDError(f"{cap.path}/{PREFIX_FILE}: {exc}") from None
        caps = pro.capabilities + (() if mr.CAPABILITY in pro.capabilities
                                   else (mr.CAPABILITY,))
        sid = int(cap.manifest.get("ram_section_id", 1))
        trailer = qs.mapped_ram_trailer(sid, cap.tail,
                                        switchover_start=bool(cap.manifest.get("switchover_start")))
        ps = int(cap.manifest.get("page_size", 4096))
        return cls(out_file, qs.encode_prologue(pro, caps), sid,
                   [qs.BlockInfo(b.name, b.used_length) for b in cap.blocks], trailer,
                   page_size=ps, file_offset=file_offset)

    def region(self, index: int) -> tuple[int, int]:
        """(pages offset, length) of block ``index``."""
        return self.layout.headers[index].pages_offset, self.infos[index].length

    def copy_from(self, fds: list[int], *, threads: int,
                  expect: list[str] | None = None) -> CopyStats:
        """Write the non-zero pages of each block read from ``fds[i]`` (whole block files) and
        the bitmaps; with ``expect``, check each block's sha256 read alongside."""
        ps = self.page_size
        digest = None
        if expect is not None:
            digest = OrderedDigest([(fd, 0, b.length) for fd, b in zip(fds, self.infos,
                                                                       strict=True)],
                                   chunk_bytes=CHUNK_PAGES * ps,
                                   what=lambda i: f"ramblock {self.infos[i].name}")
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
            for info, got, want in zip(self.infos, digests, expect, strict=True):
                if got != want:
                    raise MultiFDError(f"ramblock {info.name}: sha256 {got[:16]}... differs "
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
        starts, ends, mask = _nonzero_runs(span, ch.count, ps)
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


# --------------------------------------------------------------------------- replay source


def load_file_capture(path: str | os.PathLike[str], *, file_offset: int = 0,
                      page_size: int = 4096) -> Capture:
    """A mapped-ram file as a replay source: the prefix without the mapped-ram capability,
    the device tail, each block over its pages region, and for each block the pages stored
    (replay sends only those: absent pages stay as the destination has them, as when QEMU
    restores the file)."""
    src = open_mapped_ram(path, file_offset=file_offset, page_size=page_size)
    try:
        blocks = [src.map_block(i) for i in range(len(src.blocks))]
    except BaseException:
        src.close()
        raise
    manifest = {"format": MANIFEST_FORMAT, "machine": src.prologue.machine,
                "page_size": page_size, "ram_section_id": src.section_id,
                "sync_mode": sync_mode(src.prologue.machine),
                "switchover_start": src.switchover_start}
    return Capture(Path(path), manifest, qs.encode_prologue(src.prologue,
                                                            src.socket_capabilities),
                   src.tail, blocks, pages=src.present_slices, closer=src.close)


# --------------------------------------------------------------------------- output files


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
