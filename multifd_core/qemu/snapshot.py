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
import time
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.digest import manifest_digest
from multifd_core.engine.writeback import Writeback
from multifd_core.errors import MultiFDError
from multifd_core.qemu import mappedram as mr
from multifd_core.qemu import stream as qs
from multifd_core.qemu.capture import (
    MANIFEST_FORMAT,
    PREFIX_FILE,
    TAIL_FILE,
    VMDESC_FILE,
    manifest_fields,
)
from multifd_core.qemu.chunks import (
    CHUNK_PAGES,
    Chunk,
    OrderedDigest,
    plan_chunks,
    read_exact,
    run_chunks,
    write_all,
)
from multifd_core.qemu.mappedfile import (
    CopyStats,
    MappedRamFile,
    MappedRamWriter,
    nonzero_runs,
    open_mapped_ram,
    sync_mode,
)
from multifd_core.qemu.replay import Capture, load_capture
from multifd_core.session.outdir import FileOutput
from multifd_core.wire import format_uuid

DEFAULT_THREADS = 4


# --------------------------------------------------------------------------- import


def import_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                threads: int = DEFAULT_THREADS, file_offset: int = 0, page_size: int = 4096,
                preallocate: bool = False) -> dict[str, Any]:
    """Read the mapped-ram file ``path`` into the capture directory ``out_dir`` (the layout
    and manifest of ``qemu capture``). Each block's digest is computed by reading back what was
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
        starts, ends, mask = nonzero_runs(span, b - a, ps, present[a:b])
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
    extra = manifest_fields(
        pro, prefix, capabilities=src.socket_capabilities, page_size=src.page_size,
        vmdesc_length=len(src.vmdesc),
        tail={"offset": None, "length": len(src.tail),
              "sha256": hashlib.sha256(src.tail).hexdigest(),
              "device_bytes": len(src.tail) - len(src.vmdesc) - 5},
        uuid=format_uuid(pro.uuid or bytes(16)), method=None, channels=None,
        sync_mode=sync_mode(pro.machine), return_path=False,
        switchover_start=src.switchover_start, zero_page_detection="mapped-ram",
        ram_section_id=src.section_id, commands=[c.name for c in src.commands],
        source={"kind": "mapped-ram", "file": os.path.abspath(src.path),
                "file_offset": src.file_offset, "size": src.size,
                "capabilities": list(pro.capabilities),
                "blocks": [{"name": mb.info.name, "header_offset": mb.header_offset,
                            "bitmap_offset": mb.header.bitmap_offset,
                            "pages_offset": mb.header.pages_offset} for mb in src.blocks]},
        statistics=stats.as_dict())
    # The writeback thread synced the blocks while they were copied; commit's fsync finishes.
    output.commit({b.name: d for b, d in zip(blocks, digests, strict=True)}, extra,
                  algorithm=DEFAULT_DIGEST)
    return {"blocks": [{"name": b.name, "length": b.used_length, "file": f[1],
                        DEFAULT_DIGEST: d}
                       for b, f, d in zip(blocks, output.files, digests, strict=True)], **extra}


# --------------------------------------------------------------------------- export


def export_capture(capture_dir: str | os.PathLike[str], out_file: str | os.PathLike[str], *,
                   threads: int = DEFAULT_THREADS, file_offset: int = 0,
                   verify: bool = True) -> dict[str, Any]:
    """Write the capture in ``capture_dir`` as a mapped-ram file QEMU restores with
    ``migrate-incoming file:OUT_FILE`` (``,offset=N`` with ``file_offset``). With ``verify``
    each block's digest is checked against the manifest while it is copied; the file is
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
        writer = _writer_for(cap, out_file, file_offset)
        try:
            stats = writer.copy_from(fds, threads=threads,
                                     expect=[manifest_digest(b) for b in cap.manifest["blocks"]]
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


def _writer_for(cap: Capture, out_file: str | os.PathLike[str],
                file_offset: int) -> MappedRamWriter:
    """A writer laid out for ``cap``: its configuration with mapped-ram added, its blocks,
    and its device tail after them."""
    try:
        pro = qs.parse_prologue(cap.prefix)
    except qs.StreamError as exc:
        raise MultiFDError(f"{cap.path}/{PREFIX_FILE}: {exc}") from None
    caps = pro.capabilities + (() if mr.CAPABILITY in pro.capabilities else (mr.CAPABILITY,))
    sid = int(cap.manifest.get("ram_section_id", 1))
    writer = MappedRamWriter(out_file, qs.encode_prologue(pro, caps), sid,
                             [qs.BlockInfo(b.name, b.used_length) for b in cap.blocks],
                             page_size=int(cap.manifest.get("page_size", 4096)),
                             file_offset=file_offset)
    try:
        writer.write_trailer(qs.mapped_ram_trailer(
            sid, cap.tail, switchover_start=bool(cap.manifest.get("switchover_start"))))
    except BaseException:
        writer.discard()
        raise
    return writer


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


