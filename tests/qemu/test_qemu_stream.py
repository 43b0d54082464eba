"""The main-stream reader and writer, on the annotated stream of the spec and on real
streams recorded from QEMU 10.0.2 (tests/qemu/data, made by make_vectors.py)."""

from __future__ import annotations

import json
import struct

import pytest
from qemu_support import read_vector

from multifd_core.qemu import stream as qs

BLOCKS = (qs.BlockInfo("mem", 0x4000000), qs.BlockInfo("/rom@etc/acpi/tables", 0x20000),
          qs.BlockInfo("pc.bios", 0x40000), qs.BlockInfo("pc.rom", 0x20000),
          qs.BlockInfo("/rom@etc/table-loader", 0x1000),
          qs.BlockInfo("/rom@etc/acpi/rsdp", 0x1000))
VMDESC = json.dumps({"page_size": 4096, "devices": []}).encode()


def annotated_stream(*, device: bytes = b"\x04\x00\x00\x00\x00\x05timer" + bytes(8)
                     + b"DEVICE" + qs.encode_footer(0)) -> bytes:
    """The stream of spec section 2.8, with a stand-in device tail."""
    return (qs.encode_header() + qs.encode_configuration("pc-i440fx-10.0")
            + qs.ram_start_section(1, BLOCKS, flush=True)
            + qs.ram_end_section(1, flush=False, kind=qs.SECTION_PART) * 2
            + qs.encode_command(qs.CMD_SWITCHOVER_START)
            + qs.ram_end_section(1, flush=True)
            + device + b"\x00" + b"\x06" + struct.pack(">I", len(VMDESC)) + VMDESC)


def parse(data: bytes, chunk: int = 4096) -> tuple[qs.MainStreamReader, list, bytes]:
    r = qs.MainStreamReader()
    events, tail = [], b""
    for i in range(0, len(data), chunk):
        r.feed(data[i : i + chunk])
        for ev in r.events():
            if isinstance(ev, qs.TailData):
                tail += ev.data
            else:
                events.append(ev)
    r.close()
    return r, events, tail


def test_annotated_stream_offsets_match_the_spec() -> None:
    data = annotated_stream()
    assert data[0x1B] == qs.SECTION_START
    assert data[0x2C:0x34] == bytes.fromhex("0000000004082004")
    assert data[0xB5:0xBD] == bytes.fromhex("0000000000000200")
    assert data[0xCA:0xDC] == bytes.fromhex("02000000010000000000000010" "7e00000001")
    assert data[0xEE:0xF3] == bytes.fromhex("08000b0000")
    assert data[0x10D] == qs.SECTION_FULL


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_annotated_stream_events(chunk: int) -> None:
    data = annotated_stream()
    r, events, tail = parse(data, chunk)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Prologue", "SectionHeader", "MemSize", "Flush", "Eos", "SectionFooter",
                     "SectionHeader", "Eos", "SectionFooter", "SectionHeader", "Eos",
                     "SectionFooter", "Command", "SectionHeader", "Flush", "Eos",
                     "SectionFooter"]
    pro = events[0]
    assert pro.machine == "pc-i440fx-10.0" and pro.raw == data[:27]
    assert events[2].total == 0x4082000 and events[2].blocks == BLOCKS
    assert r.tail_offset == 0x10D and tail == data[0x10D:]
    device, desc = qs.split_tail(tail)
    assert desc == VMDESC and device.endswith(qs.encode_footer(0) + b"\x00")
    assert r.flushes == 2 and r.eos_count == 4 and r.ram_end_seen


@pytest.mark.parametrize("name, machine, flushes, zero_records, switchover", [
    ("pc-10.0-paused", "pc-i440fx-10.0", 2, 0, True),
    ("q35-10.0-running", "pc-q35-10.0", 2, 0, True),
    ("pc-8.0-legacy", "pc-i440fx-8.0", 0, 5541, False),
    ("pc-10.0-legacy-running", "pc-i440fx-10.0", 3, 16000, True),
])
def test_real_streams(name: str, machine: str, flushes: int, zero_records: int,
                      switchover: bool) -> None:
    data = read_vector(f"{name}.main.gz")
    r, events, tail = parse(data, 1500)
    assert r.prologue is not None and r.prologue.machine == machine
    assert r.prologue.capabilities == () and r.prologue.uuid is None
    mem = next(e for e in events if isinstance(e, qs.MemSize))
    assert [b.name for b in mem.blocks][0] == "mem"
    assert sum(b.length for b in mem.blocks) == mem.total == 0x4082000
    assert r.flushes >= flushes  # one more when an iteration wrapped the block list
    if flushes == 0:
        assert r.flushes == 0  # per-section source: EOS is the sync point
    pages = [e for e in events if isinstance(e, qs.RamPage)]
    assert all(p.data is None for p in pages)
    if zero_records:
        assert len(pages) >= zero_records
    else:
        assert not pages
    assert any(c.cmd == qs.CMD_SWITCHOVER_START for c in r.commands) == switchover
    device, desc = qs.split_tail(tail)
    assert json.loads(desc)["page_size"] == 4096
    assert device[0] == qs.SECTION_FULL and device[-1] == qs.EOF
    assert qs.tail_complete(tail) and not qs.tail_complete(tail[:-1])
    assert r.tail_offset + len(tail) == len(data)


def test_continue_uses_the_block_of_an_earlier_section() -> None:
    sid = 3
    data = (qs.encode_header() + qs.encode_configuration("pc-i440fx-8.0")
            + qs.ram_start_section(sid, BLOCKS, flush=False)
            + qs.encode_section_short(qs.SECTION_PART, sid)
            + qs.encode_page(0x1000, "pc.rom", None) + qs.encode_flag(qs.FLAG_EOS)
            + qs.encode_footer(sid)
            + qs.encode_section_short(qs.SECTION_END, sid)
            + qs.encode_page(0x2000, None, b"\xab" * 4096) + qs.encode_flag(qs.FLAG_EOS)
            + qs.encode_footer(sid) + b"\x00")
    _, events, tail = parse(data, 3)
    pages = [e for e in events if isinstance(e, qs.RamPage)]
    assert pages == [qs.RamPage("pc.rom", 0x1000, None),
                     qs.RamPage("pc.rom", 0x2000, b"\xab" * 4096)]
    assert tail == b"\x00" and qs.split_tail(tail) == (b"\x00", None)


def test_return_path_messages() -> None:
    assert qs.pong(b"\x00\x00\x00\x01") == bytes.fromhex("0002000400000001")
    assert qs.shut(0) == bytes.fromhex("0001000400000000")


def _bad(data: bytes, match: str) -> None:
    r = qs.MainStreamReader()
    r.feed(data)
    with pytest.raises(qs.StreamError, match=match):
        list(r.events())
        r.close()


HEAD = qs.encode_header() + qs.encode_configuration("pc-i440fx-10.0")
START = qs.ram_start_section(1, BLOCKS, flush=True)


@pytest.mark.parametrize("data, match", [
    (b"QEVX\x00\x00\x00\x03", "Not a migration stream"),
    (b"QEVM\x00\x00\x00\x02", "SaveVM v2 format is obsolete"),
    (b"QEVM\x00\x00\x00\x04", "Unsupported migration stream version 4"),
    (qs.encode_header() + b"\x01", "Configuration section missing"),
    (qs.encode_header() + qs.encode_configuration("pc") + b"\x05\x04abcd" + bytes(4) + b"x",
     "unknown configuration subsection 'abcd'"),
    (HEAD + qs.encode_section_start(1, "ram", 0, 5), "RAM section version 5, expected 4"),
    (HEAD + qs.encode_section_start(2, "timer", 0, 2, qs.SECTION_FULL),
     "unexpected section FULL 'timer'.*before the RAM END"),
    (HEAD + qs.encode_command(6, b""), "unexpected command 6"),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 1)
     + qs.encode_page(0, "nope", None), 'Unknown ramblock "nope"'),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 1)
     + struct.pack(">Q", 0x1000 | qs.FLAG_ZERO) + b"\x07pc.bios\x05",
     "Found a zero page with value 5"),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 1)
     + struct.pack(">Q", qs.FLAG_XBZRLE), "Unknown combination of migration flags: 0x40"),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 1)
     + qs.encode_page(0x40000, "pc.bios", None), "beyond ramblock pc.bios"),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 1)
     + qs.encode_page(0, None, None), "CONTINUE page record with no previous block"),
    (HEAD + START + qs.encode_section_short(qs.SECTION_PART, 2), "id 2"),
    (HEAD + qs.encode_section_start(1) + struct.pack(">Q", 0x4083000 | qs.FLAG_MEM_SIZE)
     + qs.encode_mem_size(BLOCKS)[8:] + qs.encode_flag(qs.FLAG_EOS), 'Unknown ramblock ""'),
    (HEAD + qs.encode_section_start(1) + struct.pack(">Q", 0x4010000 | qs.FLAG_MEM_SIZE)
     + qs.encode_mem_size(BLOCKS)[8:], "sum to 0x4020000, expected the listed total"),
    (HEAD + qs.encode_section_start(1) + qs.encode_flag(qs.FLAG_EOS) + qs.encode_footer(9),
     "Mismatched section id in footer"),
    (HEAD + qs.encode_section_start(1) + qs.encode_flag(qs.FLAG_EOS) + b"\x00",
     "Missing section footer"),
    (HEAD + START + b"\x00", "EOF marker before the RAM END"),
    (HEAD + START + qs.ram_end_section(1, flush=True) + qs.ram_end_section(1, flush=True),
     "right after the RAM END"),
    (HEAD + START, "ended early, in a section header, before the RAM END"),
    (HEAD + START[:-3], "ended early, in a section footer"),
])
def test_bad_streams(data: bytes, match: str) -> None:
    _bad(data, match)


@pytest.mark.parametrize("tail, match", [
    (b"\x04abc", "does not end with the EOF marker"),
    (b"\x00\x06\x00\x00\x00\x09{}", "does not end with the EOF marker"),
])
def test_bad_tails(tail: bytes, match: str) -> None:
    with pytest.raises(qs.StreamError, match=match):
        qs.split_tail(tail)


def test_truncated_real_stream_is_an_early_end() -> None:
    data = read_vector("pc-10.0-paused.main.gz")
    r = qs.MainStreamReader()
    r.feed(data[:200])
    list(r.events())
    with pytest.raises(qs.StreamError, match="ended early"):
        r.close()


def test_x_ignore_shared_block_list_has_addresses() -> None:
    blocks = (qs.BlockInfo("mem", 0x4000000, addr=0), qs.BlockInfo("pc.bios", 0x40000,
                                                                      addr=0xFFFC0000))
    data = (qs.encode_header()
            + qs.encode_configuration("pc-i440fx-10.0", capabilities=("x-ignore-shared",))
            + qs.ram_start_section(1, blocks, flush=True) + qs.ram_end_section(1, flush=True)
            + b"\x00")
    assert bytes.fromhex("05") + b"\x1aconfiguration/capabilities" + bytes.fromhex(
        "0000000100000001") + b"\x0fx-ignore-shared" in data
    _, events, _ = parse(data)
    assert events[0].capabilities == ("x-ignore-shared",)
    assert next(e for e in events if isinstance(e, qs.MemSize)).blocks == blocks
