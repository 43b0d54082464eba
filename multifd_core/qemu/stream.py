"""QEMU's main migration stream (savevm format 3, RAM section version 4), sans-IO.

``MainStreamReader`` is fed bytes as they arrive and yields events: the prologue (header and
configuration section), commands, RAM section records (block list, pages, MULTIFD_FLUSH, EOS)
and, once the RAM END section is over, the device tail as raw chunks. Device sections carry no
length, so the tail is never parsed: it is kept verbatim (it ends with ``00`` and the
``06 len JSON`` vmdesc). The ``encode_*`` functions write the same format for a replay source.
Every integer is big-endian.

A stream with the ``mapped-ram`` capability (a ``migrate file:`` save) is read from a file: each
block of the list is followed by a mapped-ram header (``MappedBlock`` event) and the stream goes
on after that block's pages region, so the reader jumps there; its driver reads the file from
``feed_offset`` (see ``multifd_core.qemu.mappedram`` and docs/mapped-ram.md).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from multifd_core.errors import MultiFDError
from multifd_core.qemu import mappedram as mr

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_V2 = 2

# Section types (the top-level byte).
EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E
SECTION_NAMES = {SECTION_START: "START", SECTION_PART: "PART", SECTION_END: "END",
                 SECTION_FULL: "FULL"}

# Commands on the main stream.
CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_SWITCHOVER_START = 11
COMMAND_LENGTHS = {CMD_OPEN_RETURN_PATH: 0, CMD_PING: 4, CMD_SWITCHOVER_START: 0}
COMMAND_NAMES = {CMD_OPEN_RETURN_PATH: "OPEN_RETURN_PATH", CMD_PING: "PING",
                 CMD_SWITCHOVER_START: "SWITCHOVER_START"}

# Return-path messages (destination -> source, on the main socket).
RP_SHUT = 1
RP_PONG = 2

# RAM section.
RAM_IDSTR = "ram"
RAM_VERSION = 4
FLAG_ZERO = 0x002
FLAG_MEM_SIZE = 0x004
FLAG_PAGE = 0x008
FLAG_EOS = 0x010
FLAG_CONTINUE = 0x020
FLAG_XBZRLE = 0x040
FLAG_HOOK = 0x080
FLAG_MULTIFD_FLUSH = 0x200

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_CMD = struct.Struct(">BHH")

#: The most ramblocks a MEM_SIZE record may list (a real guest has a few dozen).
MAX_RAM_BLOCKS = 1024

#: Configuration subsections this reader understands (all version 1).
CONFIG_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities",
                      "configuration/uuid")


class StreamError(MultiFDError):
    """The main stream breaks the format, or holds something a capture cannot take."""

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (main stream offset {offset})")


class _NeedData(Exception):
    """Not enough bytes buffered for the next item."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class BlockInfo:
    """One entry of the MEM_SIZE block list."""

    name: str
    length: int
    page_size: int | None = None  # only with postcopy-ram and a non-host page size
    addr: int | None = None  # only with x-ignore-shared


@dataclass(frozen=True)
class Prologue:
    """File header and configuration section; ``raw`` is every byte of both."""

    machine: str
    capabilities: tuple[str, ...]
    uuid: bytes | None
    target_page_bits: int | None
    raw: bytes


@dataclass(frozen=True)
class Command:
    cmd: int
    data: bytes

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.cmd, str(self.cmd))


@dataclass(frozen=True)
class SectionHeader:
    kind: int
    section_id: int
    idstr: str
    instance_id: int
    version: int


@dataclass(frozen=True)
class MemSize:
    total: int
    blocks: tuple[BlockInfo, ...]


@dataclass(frozen=True)
class MappedBlock:
    """A block of a mapped-ram stream: its entry in the list and its mapped-ram header (at
    ``header_offset`` in the file), checked against the file."""

    info: BlockInfo
    header: mr.MappedRamHeader
    header_offset: int


@dataclass(frozen=True)
class RamPage:
    """A ZERO (``data`` None) or PAGE record on the main channel."""

    block: str
    offset: int
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Flush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: a sync point in per-round mode."""

    section_id: int


@dataclass(frozen=True)
class Eos:
    """The end of a RAM section body: a sync point in per-section mode."""

    section_id: int
    kind: int


@dataclass(frozen=True)
class SectionFooter:
    kind: int
    section_id: int
    idstr: str


@dataclass(frozen=True)
class TailData:
    """Raw bytes of the device tail; the first chunk starts at ``offset`` of the stream."""

    offset: int
    data: bytes = field(repr=False)


Event = (Prologue | Command | SectionHeader | MemSize | MappedBlock | RamPage | Flush | Eos
         | SectionFooter | TailData)


# --------------------------------------------------------------------------- reader


class MainStreamReader:
    """Incremental parser of a precopy main stream, up to the device tail.

    ``feed(data)`` buffers bytes; ``events()`` yields every event the buffer completes.
    ``close()`` at end of input checks that the stream ended inside the tail, after the EOF
    marker (with or without the vmdesc); it returns the tail's total length.

    A mapped-ram stream needs ``file_size`` (the file's size, to check the offsets) and
    ``file_offset`` (where the stream starts in the file: ``file:PATH,offset=N``); without
    ``file_size`` (a socket) the capability is refused. The bytes fed must start at stream
    offset ``feed_offset``, which jumps forward after each mapped-ram block.
    """

    def __init__(self, *, page_size: int = 4096, file_offset: int = 0,
                 file_size: int | None = None) -> None:
        self.page_size = page_size
        self.file_offset = file_offset
        self.file_size = file_size
        self.mapped_ram = False
        self.mapped_blocks: list[MappedBlock] = []
        self._mem_total = 0
        self._mem_seen = 0
        self._mem_list: list[BlockInfo] = []
        self._mem_names: set[str] = set()
        self._pending: Event | None = None
        self._buf = bytearray()
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._state = "header"
        self.prologue: Prologue | None = None
        self.blocks: dict[str, BlockInfo] = {}
        self.ram_section_id: int | None = None
        self._section: SectionHeader | None = None
        self._last_block: str | None = None
        self.ram_end_seen = False
        self.tail_offset: int | None = None
        self.tail_length = 0
        self._tail_last = b""  # enough of the tail's end to check its shape
        self.flushes = 0
        self.eos_count = 0
        self.commands: list[Command] = []
        self._eof = False

    # ------------------------------------------------------------------ input

    @property
    def offset(self) -> int:
        """Stream offset of the next unparsed byte."""
        return self._base + self._pos

    @property
    def feed_offset(self) -> int:
        """Stream offset of the next byte ``feed`` expects (file offset minus ``file_offset``)."""
        return self._base + len(self._buf)

    @property
    def in_tail(self) -> bool:
        return self._state == "tail"

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise StreamError("data fed after close()")
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def events(self) -> Iterator[Event]:
        while True:
            if self._state == "tail":
                chunk = self._buf[self._pos :]
                if chunk:
                    start = self.offset
                    self._base += len(self._buf)
                    self._buf = bytearray()
                    self._pos = 0
                    self.tail_length += len(chunk)
                    self._tail_last = (self._tail_last + bytes(chunk))[-8:]
                    yield TailData(start, bytes(chunk))
                return
            start = self._pos
            try:
                ev = self._step()
            except _NeedData:
                self._pos = start
                return
            if ev is not None:
                yield ev
            if self._pending is not None:
                ev, self._pending = self._pending, None
                yield ev

    def close(self) -> int:
        """End of input: the stream must be inside the tail and the tail must end well."""
        self._eof = True
        if self._state != "tail":
            where = {"header": "the file header", "config": "the configuration section",
                     "top": "a section header", "ram": "a RAM section record",
                     "blocks": "the RAM block list", "footer": "a section footer"}[self._state]
            raise StreamError(f"main stream ended early, in {where}"
                              + ("" if self.ram_end_seen else ", before the RAM END section"),
                              offset=self.offset)
        return self.tail_length

    # ------------------------------------------------------------------ primitives

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            raise _NeedData
        out = bytes(self._buf[self._pos : end])
        self._pos = end
        return out

    def _u8(self) -> int:
        if self._pos >= len(self._buf):
            raise _NeedData
        v = self._buf[self._pos]
        self._pos += 1
        return v

    def _peek_u8(self) -> int:
        if self._pos >= len(self._buf):
            raise _NeedData
        return self._buf[self._pos]

    def _be(self, s: struct.Struct) -> int:
        end = self._pos + s.size
        if end > len(self._buf):
            raise _NeedData
        (v,) = s.unpack_from(self._buf, self._pos)
        self._pos = end
        return v

    def _str8(self) -> str:
        n = self._u8()
        raw = self._take(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError(f"non-ASCII name {raw!r}", offset=self.offset - n) from None

    def _error(self, message: str, at: int | None = None) -> StreamError:
        return StreamError(message, offset=self._base + (self._pos if at is None else at))

    # ------------------------------------------------------------------ grammar

    def _step(self) -> Event | None:
        state = self._state
        if state == "header":
            return self._header()
        if state == "config":
            return self._config()
        if state == "top":
            return self._top()
        if state == "ram":
            return self._ram_record()
        if state == "blocks":
            return self._block_entry()
        if state == "footer":
            return self._footer()
        raise AssertionError(state)

    def _header(self) -> None:
        magic = self._be(_BE32)
        version = self._be(_BE32)
        if magic != MAGIC:
            raise self._error(f"Not a migration stream: magic {magic:#010x}, expected "
                              f"{MAGIC:#010x} (QEVM)", 0)
        if version == VERSION_V2:
            raise self._error("SaveVM v2 format is obsolete", 4)
        if version != VERSION:
            raise self._error(f"Unsupported migration stream version {version}, expected "
                              f"{VERSION}", 4)
        self._state = "config"
        return None

    def _config(self) -> Prologue:
        start = self._pos
        kind = self._u8()
        if kind != CONFIGURATION:
            raise self._error(f"Configuration section missing: section type {kind:#04x}, "
                              f"expected {CONFIGURATION:#04x}", start)
        n = self._be(_BE32)
        if n > 255:
            raise self._error(f"machine type name of {n} bytes, expected at most 255", start)
        machine = self._take(n).decode("ascii", "replace")
        caps: tuple[str, ...] = ()
        uuid = None
        page_bits = None
        while self._peek_u8() == SUBSECTION:
            at = self._pos
            self._u8()
            name = self._str8()
            version = self._be(_BE32)
            if name not in CONFIG_SUBSECTIONS:
                raise self._error(f"unknown configuration subsection {name!r}, expected one "
                                  f"of {', '.join(CONFIG_SUBSECTIONS)}", at)
            if version != 1:
                raise self._error(f"configuration subsection {name} version {version}, "
                                  "expected 1", at)
            if name == "configuration/capabilities":
                count = self._be(_BE32)
                if count > 64:
                    raise self._error(f"{count} validated capabilities, expected at most 64",
                                      at)
                caps = tuple(self._str8() for _ in range(count))
            elif name == "configuration/uuid":
                uuid = self._take(16)
            else:
                page_bits = self._be(_BE32)
        self._state = "top"
        self.prologue = Prologue(machine, caps, uuid, page_bits,
                                 bytes(self._buf[: self._pos]) if self._base == 0 else b"")
        if mr.CAPABILITY in caps:
            if self.file_size is None:
                raise self._error("a mapped-ram stream (capability mapped-ram) on a socket: "
                                  "its pages live in a file; read the file instead", start)
            self.mapped_ram = True
        return self.prologue

    def _top(self) -> Event | None:
        start = self._pos
        kind = self._u8()
        if self.ram_end_seen:
            if kind not in (SECTION_FULL, EOF, COMMAND, SECTION_START) or (
                    kind == SECTION_START and self._full_header_is_ram()):
                raise self._error(f"unexpected section type {kind:#04x} right after the RAM "
                                  "END section", start)
            self._pos = start
            self.tail_offset = self._base + start
            self._state = "tail"
            return None
        if kind == COMMAND:
            cmd = self._be(_BE16)
            n = self._be(_BE16)
            data = self._take(n)
            want = COMMAND_LENGTHS.get(cmd)
            if want is None:
                raise self._error(f"unexpected command {cmd} on a precopy stream (known: "
                                  f"{', '.join(f'{k} {v}' for k, v in COMMAND_NAMES.items())})",
                                  start)
            if n != want:
                raise self._error(f"command {COMMAND_NAMES[cmd]} with length {n}, expected "
                                  f"{want}", start)
            ev = Command(cmd, data)
            self.commands.append(ev)
            return ev
        if kind in (SECTION_START, SECTION_FULL):
            section_id = self._be(_BE32)
            idstr = self._str8()
            instance_id = self._be(_BE32)
            version = self._be(_BE32)
            hdr = SectionHeader(kind, section_id, idstr, instance_id, version)
            if kind == SECTION_FULL or idstr != RAM_IDSTR:
                raise self._error(
                    f"unexpected section {SECTION_NAMES[kind]} {idstr!r} (instance "
                    f"{instance_id}) before the RAM END section; only 'ram' is supported", start)
            if self.ram_section_id is not None:
                raise self._error("a second RAM START section", start)
            if instance_id != 0:
                raise self._error(f"RAM section instance {instance_id}, expected 0", start)
            if version != RAM_VERSION:
                raise self._error(f"RAM section version {version}, expected {RAM_VERSION}",
                                  start)
            self.ram_section_id = section_id
            self._section = hdr
            self._state = "ram"
            return hdr
        if kind in (SECTION_PART, SECTION_END):
            section_id = self._be(_BE32)
            if self.ram_section_id is None or section_id != self.ram_section_id:
                raise self._error(
                    f"unexpected section {SECTION_NAMES[kind]} with id {section_id}; expected "
                    f"the RAM section id {self.ram_section_id}", start)
            hdr = SectionHeader(kind, section_id, RAM_IDSTR, 0, RAM_VERSION)
            self._section = hdr
            self._state = "ram"
            return hdr
        if kind == EOF:
            raise self._error("EOF marker before the RAM END section", start)
        raise self._error(f"unexpected section type {kind:#04x}", start)

    def _full_header_is_ram(self) -> bool:
        self._be(_BE32)
        return self._str8() == RAM_IDSTR

    def _ram_record(self) -> Event | None:
        start = self._pos
        hdr = self._be(_BE64)
        mask = self.page_size - 1
        flags = hdr & mask
        addr = hdr & ~mask
        sec = self._section
        assert sec is not None
        if flags == FLAG_EOS:
            self._state = "footer"
            self.eos_count += 1
            return Eos(sec.section_id, sec.kind)
        if flags == FLAG_MULTIFD_FLUSH:
            self.flushes += 1
            return Flush(sec.section_id)
        if flags == FLAG_MEM_SIZE:
            if sec.kind != SECTION_START or self.blocks or self._mem_list:
                raise self._error("MEM_SIZE record outside the RAM START section", start)
            self._mem_total = addr
            self._state = "blocks"
            return self._mem_size() if addr == 0 else None
        base = flags & ~FLAG_CONTINUE
        if base in (FLAG_ZERO, FLAG_PAGE) and self.mapped_ram:
            raise self._error(f"a page record (flags {flags:#x}) in a mapped-ram stream, whose "
                              "pages are in the file's pages regions", start)
        if base in (FLAG_ZERO, FLAG_PAGE):
            if flags & FLAG_CONTINUE:
                if self._last_block is None:
                    raise self._error("CONTINUE page record with no previous block", start)
                name = self._last_block
            else:
                name = self._str8()
            info = self.blocks.get(name)
            if info is None:
                raise self._error(f'Unknown ramblock "{name}", cannot accept migration', start)
            if addr + self.page_size > info.length:
                raise self._error(f"page offset {addr:#x} beyond ramblock {name} of length "
                                  f"{info.length:#x}", start)
            if base == FLAG_ZERO:
                fill = self._u8()
                if fill != 0:
                    raise self._error(f"Found a zero page with value {fill}", start)
                data = None
            else:
                data = self._take(self.page_size)
            self._last_block = name
            return RamPage(name, addr, data)
        what = {FLAG_XBZRLE: "XBZRLE pages", FLAG_HOOK: "RDMA hooks"}.get(base & ~FLAG_CONTINUE)
        raise self._error(f"Unknown combination of migration flags: {flags:#x}"
                          + (f" ({what} are not supported)" if what else ""), start)

    def _block_entry(self) -> MemSize | MappedBlock | None:
        """One entry of the MEM_SIZE block list (name, length[, addr][, mapped-ram header])."""
        start = self._pos
        total = self._mem_total
        seen = self._mem_seen
        with_addr = "x-ignore-shared" in (self.prologue.capabilities if self.prologue else ())
        if len(self._mem_list) >= MAX_RAM_BLOCKS:
            raise self._error(f"MEM_SIZE lists more than {MAX_RAM_BLOCKS} ramblocks", start)
        name = self._str8()
        if not name:
            raise self._error('Unknown ramblock "" in the MEM_SIZE list (total '
                              f"{total:#x}, listed so far {seen:#x}: a block is missing)", start)
        length = self._be(_BE64)
        addr = self._be(_BE64) if with_addr else None
        if length % self.page_size:
            raise self._error(f"ramblock {name} length {length:#x} is not a multiple of "
                              f"the page size", start)
        if name in self._mem_names:
            raise self._error(f"ramblock {name} listed twice", start)
        if seen + length > total:
            raise self._error(f"MEM_SIZE block lengths sum to {seen + length:#x}, expected the "
                              f"listed total {total:#x}", start)
        info = BlockInfo(name, length, None, addr)
        event: MemSize | MappedBlock | None = None
        if self.mapped_ram:
            at = self.file_offset + self._base + self._pos
            header = mr.MappedRamHeader.decode(self._take(mr.HEADER_SIZE))
            header.validate(name, length, page_size=self.page_size, header_offset=at,
                            file_size=self.file_size)
            event = MappedBlock(info, header, at)
            self.mapped_blocks.append(event)
            # The stream goes on after the pages region: drop what was read ahead.
            self._buf = bytearray()
            self._pos = 0
            self._base = header.end(length) - self.file_offset
        self._mem_list.append(info)
        self._mem_names.add(name)
        self._mem_seen += length
        if self._mem_seen == total:
            mem = self._mem_size()
            if event is None:
                return mem
            self._pending = mem
        return event

    def _mem_size(self) -> MemSize:
        self.blocks = {b.name: b for b in self._mem_list}
        self._state = "ram"
        return MemSize(self._mem_total, tuple(self._mem_list))

    def _footer(self) -> SectionFooter:
        start = self._pos
        marker = self._u8()
        sec = self._section
        assert sec is not None
        if marker != FOOTER:
            raise self._error(f"Missing section footer for {sec.idstr}: byte {marker:#04x}, "
                              f"expected {FOOTER:#04x}", start)
        section_id = self._be(_BE32)
        if section_id != sec.section_id:
            raise self._error(f"Mismatched section id in footer for {sec.idstr}: read "
                              f"{section_id}, expected {sec.section_id}", start)
        if sec.kind == SECTION_END:
            self.ram_end_seen = True
        self._state = "top"
        return SectionFooter(sec.kind, section_id, sec.idstr)


def parse_prologue(raw: bytes) -> Prologue:
    """The prologue of a stream that holds only the header and configuration section (a
    capture's prefix.bin): the section after it is implied, so the subsection list ends."""
    reader = MainStreamReader(file_size=len(raw) + 1)  # a file's or a socket's, alike here
    reader.feed(raw + bytes([EOF]))
    for ev in reader.events():
        if isinstance(ev, Prologue) and len(ev.raw) == len(raw):
            return ev
    raise StreamError(f"{len(raw)} bytes of prefix hold no whole header and configuration "
                      "section")


# --------------------------------------------------------------------------- tail helpers


def split_tail(tail: bytes) -> tuple[bytes, bytes | None]:
    """Split a device tail into (device sections + EOF byte, vmdesc JSON or None).

    The JSON holds no NUL, so the EOF marker is the last NUL byte or sits at most 5 bytes
    before it (the vmdesc's be32 length may contain NULs).
    """
    if tail.endswith(b"\0"):
        return tail, None
    last = tail.rfind(b"\0")
    for k in range(max(last - 5, 0), last + 1) if last >= 0 else ():
        if tail[k] == EOF and len(tail) >= k + 6 and tail[k + 1] == VMDESCRIPTION:
            (n,) = _BE32.unpack_from(tail, k + 2)
            if n == len(tail) - k - 6:
                return tail[: k + 1], tail[k + 6 :]
    raise StreamError("the device tail does not end with the EOF marker (00) followed by "
                      "nothing or by a whole vmdesc (06, be32 length, JSON)")


#: The largest vmdesc a capture takes (QEMU's are a few hundred KiB).
MAX_VMDESC = 64 << 20


class TailTracker:
    """Follows a device tail as it streams past, holding a few bytes of it, not the tail:
    its length, sha256, and the 11 bytes around its last NUL, where the EOF marker and the
    vmdesc header must be (the JSON after them holds no NUL)."""

    def __init__(self) -> None:
        self.length = 0
        self._sha = hashlib.sha256()
        self._last5 = b""  # the tail's last 5 bytes so far
        self._window = bytearray()  # tail[_window_at : _window_at + 11]
        self._window_at = -1
        self.last_byte = -1

    def feed(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        if not data:
            return
        self._sha.update(data)
        i = data.rfind(b"\0")
        if i >= 0:
            joined = self._last5 + data
            at = len(self._last5) + i - 5  # 5 bytes before the NUL, in ``joined``
            start = max(at, 0)
            self._window = bytearray(joined[start : start + 11])
            self._window_at = self.length - len(self._last5) + start
        elif self._window_at >= 0 and len(self._window) < 11:
            self._window += data[: 11 - len(self._window)]
        self.length += len(data)
        self._last5 = (self._last5 + data)[-5:]
        self.last_byte = data[-1]

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def split(self) -> tuple[int, int | None]:
        """(length of the device sections + EOF byte, offset of the vmdesc JSON or None)."""
        if self.last_byte == EOF:
            return self.length, None
        w, base = self._window, self._window_at
        for j in range(len(w)):
            k = base + j
            if w[j] == EOF and j + 6 <= len(w) and w[j + 1] == VMDESCRIPTION:
                (n,) = _BE32.unpack_from(w, j + 2)
                if n == self.length - k - 6:
                    if n > MAX_VMDESC:
                        raise StreamError(f"vmdesc of {n} bytes, at most {MAX_VMDESC} taken")
                    return k + 1, k + 6
        raise StreamError("the device tail does not end with the EOF marker (00) followed by "
                          "nothing or by a whole vmdesc (06, be32 length, JSON)")

    def complete(self) -> bool:
        """Whether the tail so far ends with EOF + a vmdesc of the announced length."""
        if self.last_byte != ord("}"):
            return False
        try:
            return self.split()[1] is not None
        except StreamError:
            return False


def parse_vmdesc(raw: bytes) -> Any:
    """The vmdesc JSON, parsed; a ``StreamError`` names what is wrong with it."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise StreamError("the vmdesc JSON is nested too deeply to parse") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise StreamError(f"the vmdesc JSON does not parse: {exc}") from None


def tail_complete(tail: bytes) -> bool:
    """Whether ``tail`` ends with EOF + a whole, parseable vmdesc (for the return path, where
    the source waits for SHUT before closing)."""
    if not tail.endswith(b"}"):
        return False
    try:
        _, desc = split_tail(tail)
        if desc is None:
            return False
        parse_vmdesc(desc)
    except StreamError:
        return False
    return True


# --------------------------------------------------------------------------- writer


def encode_header() -> bytes:
    return _BE32.pack(MAGIC) + _BE32.pack(VERSION)


def encode_configuration(machine: str, *, capabilities: tuple[str, ...] = (),
                         uuid: bytes | None = None, target_page_bits: int | None = None) -> bytes:
    """The configuration section; its subsections in QEMU's order (target-page-bits,
    capabilities, uuid), each only when it has something to say."""
    raw = machine.encode()
    out = bytes([CONFIGURATION]) + _BE32.pack(len(raw)) + raw
    if target_page_bits is not None:
        out += _subsection("configuration/target-page-bits", _BE32.pack(target_page_bits))
    if capabilities:
        body = _BE32.pack(len(capabilities)) + b"".join(_str8(c) for c in capabilities)
        out += _subsection("configuration/capabilities", body)
    if uuid is not None:
        out += _subsection("configuration/uuid", uuid)
    return out


def encode_prologue(prologue: Prologue, capabilities: tuple[str, ...]) -> bytes:
    """File header and configuration of ``prologue`` with ``capabilities`` instead of its own
    (a mapped-ram file validates ``mapped-ram``; a socket destination must not see it)."""
    return encode_header() + encode_configuration(
        prologue.machine, capabilities=capabilities, uuid=prologue.uuid,
        target_page_bits=prologue.target_page_bits)


def _subsection(name: str, body: bytes) -> bytes:
    return bytes([SUBSECTION]) + _str8(name) + _BE32.pack(1) + body


def _str8(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > 255:
        raise MultiFDError(f"name {s!r} longer than 255 bytes")
    return bytes([len(raw)]) + raw


def encode_command(cmd: int, data: bytes = b"") -> bytes:
    return _CMD.pack(COMMAND, cmd, len(data)) + data


def encode_section_start(section_id: int, idstr: str = RAM_IDSTR, instance_id: int = 0,
                         version: int = RAM_VERSION, kind: int = SECTION_START) -> bytes:
    return (bytes([kind]) + _BE32.pack(section_id) + _str8(idstr) + _BE32.pack(instance_id)
            + _BE32.pack(version))


def encode_section_short(kind: int, section_id: int) -> bytes:
    return bytes([kind]) + _BE32.pack(section_id)


def encode_footer(section_id: int) -> bytes:
    return bytes([FOOTER]) + _BE32.pack(section_id)


def encode_mem_size(blocks: list[BlockInfo] | tuple[BlockInfo, ...]) -> bytes:
    total = sum(b.length for b in blocks)
    return _BE64.pack(total | FLAG_MEM_SIZE) + b"".join(encode_block_entry(b) for b in blocks)


def encode_block_entry(block: BlockInfo) -> bytes:
    """One entry of the MEM_SIZE list: name, length[, address] (a mapped-ram header follows
    in a mapped-ram stream)."""
    return (_str8(block.name) + _BE64.pack(block.length)
            + (b"" if block.addr is None else _BE64.pack(block.addr)))


def encode_flag(flag: int) -> bytes:
    return _BE64.pack(flag)


def encode_page(offset: int, block: str | None, data: bytes | None) -> bytes:
    """A ZERO (data None) or PAGE record; ``block`` None sets CONTINUE."""
    flags = FLAG_ZERO if data is None else FLAG_PAGE
    if block is None:
        flags |= FLAG_CONTINUE
    out = _BE64.pack(offset | flags) + (b"" if block is None else _str8(block))
    return out + (b"\0" if data is None else bytes(data))


def ram_start_section(section_id: int, blocks: list[BlockInfo] | tuple[BlockInfo, ...], *,
                      flush: bool) -> bytes:
    """RAM START: MEM_SIZE + block list [+ MULTIFD_FLUSH] + EOS + footer."""
    return (encode_section_start(section_id) + encode_mem_size(blocks)
            + (encode_flag(FLAG_MULTIFD_FLUSH) if flush else b"") + encode_flag(FLAG_EOS)
            + encode_footer(section_id))


def ram_end_section(section_id: int, *, flush: bool, kind: int = SECTION_END) -> bytes:
    """RAM END (or PART): [MULTIFD_FLUSH +] EOS + footer."""
    return (encode_section_short(kind, section_id)
            + (encode_flag(FLAG_MULTIFD_FLUSH) if flush else b"") + encode_flag(FLAG_EOS)
            + encode_footer(section_id))


def encode_return_path(msg_type: int, data: bytes) -> bytes:
    return _BE16.pack(msg_type) + _BE16.pack(len(data)) + data


def pong(value: bytes) -> bytes:
    return encode_return_path(RP_PONG, value)


def shut(status: int = 0) -> bytes:
    return encode_return_path(RP_SHUT, _BE32.pack(status))


@dataclass(frozen=True)
class MappedRamLayout:
    """Where everything of a mapped-ram file goes: ``pieces`` are (file offset, bytes) of the
    main stream (up to and including each block's mapped-ram header), ``headers`` the blocks'
    mapped-ram headers and ``trailer_offset`` where the stream goes on after the last pages
    region."""

    pieces: tuple[tuple[int, bytes], ...]
    headers: tuple[mr.MappedRamHeader, ...]
    trailer_offset: int


def mapped_ram_layout(prologue: bytes, section_id: int,
                      blocks: list[BlockInfo] | tuple[BlockInfo, ...], *, page_size: int,
                      file_offset: int = 0) -> MappedRamLayout:
    """QEMU's layout of a mapped-ram file whose stream starts with ``prologue`` (header and
    configuration, with the mapped-ram capability) at ``file_offset``: RAM START, MEM_SIZE,
    then for each block its entry and header, its bitmap, and its pages at the next 1 MiB."""
    total = sum(b.length for b in blocks)
    head = prologue + encode_section_start(section_id) + _BE64.pack(total | FLAG_MEM_SIZE)
    pieces = [(file_offset, head)]
    headers = []
    pos = file_offset + len(head)
    for b in blocks:
        entry = encode_block_entry(b)
        header = mr.MappedRamHeader.layout(pos + len(entry), b.length, page_size)
        pieces.append((pos, entry + header.encode()))
        headers.append(header)
        pos = header.end(b.length)
    return MappedRamLayout(tuple(pieces), tuple(headers), pos)


def mapped_ram_trailer(section_id: int, tail: bytes, *, switchover_start: bool) -> bytes:
    """What follows the last pages region: the RAM START's EOS and footer, [SWITCHOVER_START,]
    the RAM END section (EOS, no MULTIFD_FLUSH: mapped-ram streams carry none) and the device
    tail."""
    return (encode_flag(FLAG_EOS) + encode_footer(section_id)
            + (encode_command(CMD_SWITCHOVER_START) if switchover_start else b"")
            + ram_end_section(section_id, flush=False) + tail)
