"""Reading a QEMU mapped-ram file (``migrate file:PATH`` with ``mapped-ram``): its main stream
(parsed by ``MainStreamReader``, jumping over the pages regions), its blocks, their bitmaps and
pages. Only the stream and one bitmap slice at a time are held in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from multifd_core.errors import MultiFDError
from multifd_core.qemu import mappedram as mr
from multifd_core.qemu import stream as qs
from multifd_core.qemu.chunks import read_exact
from multifd_core.ram import RamBlock

#: Bytes read from the file per step of the main stream.
_READ = 1 << 16
#: Pages per bitmap slice when walking a whole block (8 KiB of bitmap).
SLICE_PAGES = 1 << 16


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
