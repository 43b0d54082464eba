"""The mapped-ram format without QEMU: QEMU 10.0.2's layout (offsets read from a file it saved),
the bitmap, header checks, and files written by our writer read back by our reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.digest import digest_of
from multifd_core.qemu import mappedram as mr
from multifd_core.qemu import stream as qs
from multifd_core.qemu.mappedfile import MappedRamWriter, open_mapped_ram, sync_mode
from multifd_core.qemu.snapshot import import_file

PS = 4096
PC_BLOCKS = (qs.BlockInfo("mem", 0x4000000), qs.BlockInfo("/rom@etc/acpi/tables", 0x20000),
             qs.BlockInfo("pc.bios", 0x40000), qs.BlockInfo("pc.rom", 0x20000),
             qs.BlockInfo("/rom@etc/table-loader", 0x1000),
             qs.BlockInfo("/rom@etc/acpi/rsdp", 0x1000))
#: The first 111 bytes of `migrate file:` with mapped-ram (+/- multifd) of a 64 MiB pc guest
#: (QEMU 10.0.2), up to the first block's mapped-ram header.
PC_PROLOGUE = (b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0epc-i440fx-10.0\x05\x1a"
               b"configuration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0amapped-ram")
#: (header, bitmap, pages) offsets of each block in that file.
PC_OFFSETS = [(0x6F, 0x8B, 0x100000), (0x410001D, 0x4100039, 0x4200000),
              (0x4220010, 0x422002C, 0x4300000), (0x434000F, 0x434002B, 0x4400000),
              (0x442001E, 0x442003A, 0x4500000), (0x450101B, 0x4501037, 0x4600000)]
VMDESC = json.dumps({"page_size": PS, "devices": []}).encode()
TAIL = (b"\x04\x00\x00\x00\x02\x05timer\x00\x00\x00\x00\x00\x00\x00\x02DEVICE"
        + qs.encode_footer(2) + b"\x00\x06" + len(VMDESC).to_bytes(4, "big") + VMDESC)


def test_prologue_and_layout_match_qemu() -> None:
    pro = qs.Prologue("pc-i440fx-10.0", (), None, None, b"")
    prologue = qs.encode_prologue(pro, (mr.CAPABILITY,))
    assert prologue == PC_PROLOGUE
    assert qs.parse_prologue(prologue).capabilities == (mr.CAPABILITY,)
    layout = qs.mapped_ram_layout(prologue, 1, PC_BLOCKS, page_size=PS)
    got = [(off + len(data) - mr.HEADER_SIZE, h.bitmap_offset, h.pages_offset)
           for (off, data), h in zip(layout.pieces[1:], layout.headers, strict=True)]
    assert got == PC_OFFSETS
    assert layout.trailer_offset == 0x4601000
    assert layout.pieces[1][1][-mr.HEADER_SIZE:] == bytes.fromhex(
        "00000001" "0000000000001000" "000000000000008b" "0000000000100000")


def test_bitmap_is_little_endian_words() -> None:
    mask = np.zeros(130, dtype=bool)
    mask[[0, 9, 64, 129]] = True
    raw = mr.mask_to_bitmap(mask)
    assert len(raw) == mr.bitmap_size(130) == 24
    assert raw[0] == 0x01 and raw[1] == 0x02 and raw[8] == 0x01 and raw[16] == 0x02
    assert np.array_equal(mr.bitmap_to_mask(raw, 130), mask)
    assert mr.present_pages(raw, 130).tolist() == [0, 9, 64, 129]
    starts, ends = mr.page_runs(np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool))
    assert starts.tolist() == [0, 3, 6] and ends.tolist() == [2, 4, 7]


GOOD = mr.MappedRamHeader.layout(0x6F, 0x4000000, PS)


@pytest.mark.parametrize("header, size, field, match", [
    (mr.MappedRamHeader(2, PS, 0x8B, 0x100000), None, "version", "unknown version"),
    (mr.MappedRamHeader(0, PS, 0x8B, 0x100000), None, "version", "unknown version"),
    (mr.MappedRamHeader(1, 8192, 0x8B, 0x100000), None, "page_size", "page size mismatch"),
    (mr.MappedRamHeader(1, PS, 0x10, 0x100000), None, "bitmap_offset", "inside the stream"),
    (mr.MappedRamHeader(1, PS, 1 << 40, 0x100000), 0x4200000, "bitmap_offset",
     "bitmap offset outside the file"),
    (mr.MappedRamHeader(1, PS, 0x8B, 0x100001), None, "pages_offset", "not aligned"),
    (mr.MappedRamHeader(1, PS, 0x8B, 0x0), None, "pages_offset", "overlaps the bitmap"),
    (GOOD, 0x4000000, "pages_offset", "pages offset outside the file"),
])
def test_header_checks_name_the_field(header: mr.MappedRamHeader, size: int | None,
                                      field: str, match: str) -> None:
    with pytest.raises(mr.MappedRamError, match=match) as info:
        header.validate("mem", 0x4000000, page_size=PS, header_offset=0x6F, file_size=size)
    assert info.value.field == field
    assert f"[field {field}: received" in str(info.value) and "file offset 0x6f" in str(info.value)
    GOOD.validate("mem", 0x4000000, page_size=PS, header_offset=0x6F, file_size=0x4200000)


def test_a_mapped_ram_stream_on_a_socket_is_refused() -> None:
    reader = qs.MainStreamReader()
    reader.feed(PC_PROLOGUE + b"\x01")
    with pytest.raises(qs.StreamError, match="mapped-ram stream .* on a socket"):
        list(reader.events())


def test_sync_mode_follows_the_machine_type() -> None:
    assert sync_mode("pc-i440fx-8.0") == "per-section"
    assert sync_mode("pc-q35-7.2") == "per-section"
    assert sync_mode("pc-i440fx-8.1") == "per-round"
    assert sync_mode("pc-q35-10.0") == "per-round"
    assert sync_mode("microvm") == "per-round"


# --------------------------------------------------------------------------- round trip


def _blocks(tmp: Path) -> tuple[list[qs.BlockInfo], list[Path], list[np.ndarray]]:
    """Two blocks: 3 MiB with zero, random and half-zero pages; 16 KiB all zero."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(768, PS), dtype=np.uint8)
    a[::3] = 0
    a[1::7, : PS // 2] = 0
    b = np.zeros((4, PS), dtype=np.uint8)
    paths = []
    for i, arr in enumerate((a, b)):
        p = tmp / f"b{i}.ram"
        arr.tofile(p)
        paths.append(p)
    return [qs.BlockInfo("pc.ram", a.nbytes), qs.BlockInfo("pc.rom", b.nbytes)], paths, [a, b]


def write_file(tmp: Path, *, offset: int = 0, threads: int = 3) -> tuple[Path, list[np.ndarray]]:
    infos, paths, arrays = _blocks(tmp)
    prologue = qs.encode_prologue(qs.Prologue("pc-i440fx-10.0", (), None, None, b""),
                                  (mr.CAPABILITY,))
    out = tmp / "vm.mr"
    writer = MappedRamWriter(out, prologue, 3, infos, page_size=PS, file_offset=offset)
    writer.write_trailer(qs.mapped_ram_trailer(3, TAIL, switchover_start=True))
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        stats = writer.copy_from(fds, threads=threads,
                                 expect=[("sha256", hashlib.sha256(a.tobytes()).hexdigest())
                                         for a in arrays])
    finally:
        for fd in fds:
            os.close(fd)
    writer.commit()
    nonzero = sum(int(a.reshape(-1, PS).any(axis=1).sum()) for a in arrays)
    assert stats.written_pages == nonzero and stats.bytes_written == nonzero * PS
    assert out.stat().st_size == writer.size and not (tmp / "vm.mr.partial").exists()
    return out, arrays


@pytest.mark.parametrize("offset", [0, 0x10000])
def test_writer_then_reader(tmp_path: Path, offset: int) -> None:
    out, arrays = write_file(tmp_path, offset=offset)
    f = open_mapped_ram(out, file_offset=offset)
    try:
        assert [b.info.name for b in f.blocks] == ["pc.ram", "pc.rom"]
        assert f.blocks[0].header.pages_offset == 0x100000 if not offset else 0x200000
        assert f.switchover_start and f.section_id == 3 and f.tail == TAIL
        assert f.vmdesc == VMDESC and f.socket_capabilities == ()
        for i, arr in enumerate(arrays):
            n = len(arr)
            want = arr.reshape(n, -1).any(axis=1)
            assert np.array_equal(f.present(i, 0, n), want)
            block = f.map_block(i)
            try:
                assert np.array_equal(block.pages[want], arr[want])
            finally:
                block.close()
        # What a QEMU file has there: nothing before the offset, holes for zero pages.
        raw = out.read_bytes()
        assert raw[:offset] == bytes(offset)
        assert raw[offset : offset + len(PC_PROLOGUE)] == PC_PROLOGUE
    finally:
        f.close()


def test_import_ignores_stale_data_of_absent_pages(tmp_path: Path) -> None:
    """A running source rewrites a page in place and clears its bit when it became zero: the
    old bytes stay in the file. Import takes the bitmap's word, not the bytes."""
    out, arrays = write_file(tmp_path)
    f = open_mapped_ram(out)
    present = f.present(0, 0, 768)
    absent = int(np.flatnonzero(~present[1:] & present[:-1])[0]) + 1  # between stored pages
    pages_offset = f.blocks[0].header.pages_offset
    f.close()
    with open(out, "r+b") as fh:
        fh.seek(pages_offset + absent * PS)
        fh.write(b"\xee" * PS)
    manifest = import_file(out, tmp_path / "cap", threads=2)
    got = np.fromfile(tmp_path / "cap" / manifest["blocks"][0]["file"], dtype=np.uint8)
    assert np.array_equal(got, arrays[0].reshape(-1))
    assert manifest["blocks"][0][DEFAULT_DIGEST] == digest_of(arrays[0])
    assert manifest["blocks"][1][DEFAULT_DIGEST] == digest_of(arrays[1])
    assert (tmp_path / "cap" / "prefix.bin").read_bytes() == qs.encode_header() + \
        qs.encode_configuration("pc-i440fx-10.0")
    assert (tmp_path / "cap" / "tail.bin").read_bytes() == TAIL
    assert manifest["sync_mode"] == "per-round" and manifest["switchover_start"]


def test_export_refuses_a_damaged_capture(tmp_path: Path) -> None:
    """A block whose bytes differ from the manifest's digest: error, and no file."""
    out, _ = write_file(tmp_path)
    cap = tmp_path / "cap"
    manifest = import_file(out, cap)
    block = cap / manifest["blocks"][0]["file"]
    data = bytearray(block.read_bytes())
    data[5 * PS] ^= 1
    block.write_bytes(data)
    from multifd_core.errors import MultiFDError
    from multifd_core.qemu.snapshot import export_capture

    with pytest.raises(MultiFDError, match="ramblock pc.ram: blake3 .* differs from the "
                                           "manifest"):
        export_capture(cap, tmp_path / "again.mr")
    assert not (tmp_path / "again.mr").exists()
    assert not (tmp_path / "again.mr.partial").exists()
