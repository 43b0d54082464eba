"""QEMU snapshot files against a real QEMU >= 10 (64 MiB guests that boot no OS): files saved
by QEMU (`migrate file:` with mapped-ram, with and without multifd) imported and replayed,
captures exported and restored by QEMU, and bad files refused with one line naming the field."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_support import (
    Lab,
    assert_same_ram,
    block_digest,
    incoming_port,
    require_method,
    require_qemu,
    sha,
)

from multifd_core.cli import main
from multifd_core.qemu.mappedfile import open_mapped_ram
from multifd_core.qemu.replay import load_capture, replay
from multifd_core.qemu.snapshot import export_capture, import_file, load_file_capture
from multifd_core.qemu.vm import QemuVM
from multifd_core.session.transport import parse_address

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
N_PAGES = 0x4082000 // 4096  # every block of the 64 MiB pc and q35 guests


def save(vm: QemuVM, path: Path, channels: int | None) -> None:
    """QEMU saves ``vm`` to a mapped-ram file (multifd with ``channels``, or none)."""
    vm.set_mapped_ram(channels=channels)
    vm.migrate(f"file:{path}")
    info = vm.qmp.wait_migration(timeout=60)
    assert info["status"] == "completed", info


def restore(vm: QemuVM, path: Path, channels: int | None, *, direct_io: bool = False,
            offset: int = 0) -> None:
    vm.set_mapped_ram(channels=channels, direct_io=direct_io)
    vm.migrate_incoming(f"file:{path}" + (f",offset={offset:#x}" if offset else ""))
    info = vm.qmp.wait_migration(timeout=60)
    assert info["status"] == "completed", (info, vm.log())


def replay_into(lab: Lab, source: Path, machine: str, *, method: str, channels: int,
                loader=load_capture) -> QemuVM:
    dst = lab.destination(name="replayed", machine=machine)
    addr = incoming_port(dst, channels, method)
    capture = loader(source)
    try:
        replay(capture, parse_address(addr), channels=channels, method=method, timeout=20)
    finally:
        capture.close()
    assert dst.qmp.wait_migration(timeout=20)["status"] == "completed"
    return dst


# ---------------------------------------------------------------------- QEMU file -> us

FILES = [
    # machine, source running, multifd channels saving and restoring (None: multifd off),
    # replay channels, replay of the import (True) or of the file itself (`qemu replay FILE`)
    ("pc", False, 4, 2, True),
    ("q35", True, None, 1, True),
    ("pc", True, 8, 4, False),
    ("q35", False, 1, 8, False),
]


@pytest.mark.parametrize("machine, running, channels, rep_channels, from_import", FILES,
                         ids=[f"{m}-{'running' if r else 'paused'}-"
                              f"{'multifd' + str(c) if c else 'no-multifd'}-replay-"
                              f"{'import' if i else 'file'}" for m, r, c, _, i in FILES])
def test_qemu_file_import_replay_export(lab: Lab, machine: str, running: bool,
                                        channels: int | None, rep_channels: int,
                                        from_import: bool) -> None:
    """QEMU file -> import -> replay (zstd) into QEMU, or the file replayed directly: RAM
    identical; the import -> export -> QEMU restores it: RAM identical."""
    require_method("zstd")
    src = lab.source(machine=machine, paused=not running)
    saved = lab.workdir / "saved.mr"
    save(src, saved, channels)
    src.stop()
    cap = lab.workdir / "imported"
    manifest = import_file(saved, cap, threads=3)
    mem = manifest["blocks"][0]
    assert mem["name"] == "mem" and block_digest(mem) == sha(src.config.ram_file)
    assert sum(b["length"] for b in manifest["blocks"]) == N_PAGES * 4096
    assert manifest["configuration"]["capabilities"] == []
    assert load_capture(cap).manifest["machine"].startswith(
        "pc-q35-" if machine == "q35" else "pc-i440fx-")  # verifies every sha256

    dst = replay_into(lab, cap if from_import else saved, machine, method="zstd",
                      channels=rep_channels,
                      loader=load_capture if from_import else load_file_capture)
    assert_same_ram(dst.config.ram_file, src.config.ram_file, running=running)
    assert dst.status() == ("paused" if running else "prelaunch")
    dst.stop()

    again = lab.workdir / "exported.mr"
    export_capture(cap, again, threads=2)
    restored = lab.destination(name="restored", machine=machine)
    restore(restored, again, channels)
    assert_same_ram(restored.config.ram_file, src.config.ram_file, running=running)


# ---------------------------------------------------------------------- us -> QEMU file


def test_live_capture_export_restore(lab: Lab, start_capture) -> None:
    """Live capture (zlib) -> export at a file offset -> QEMU restores the file with multifd
    and direct-io (file:PATH,offset=N): RAM identical to the source's."""
    require_method("zlib")
    machine, running, offset = "pc", False, 0x10000
    src = lab.source(machine=machine, paused=not running)
    cap, uri = start_capture(channels=2, method="zlib")
    src.set_migration(channels=2, compression="zlib")
    src.migrate(uri)
    cap.result(60)
    src.stop()
    out = lab.workdir / "vm.mr"
    result = export_capture(cap.cap.out_dir, out, threads=4, file_offset=offset)
    assert result["verified"] and out.stat().st_size == result["size"]
    dst = lab.destination(machine=machine)
    restore(dst, out, 4, direct_io=True, offset=offset)
    assert_same_ram(dst.config.ram_file, src.config.ram_file, running=running)


def test_capture_straight_to_a_mapped_ram_file(lab: Lab, start_capture) -> None:
    """`qemu capture --mapped-ram FILE` from a running source (zstd, 2 channels): the pages
    land in the file's regions as they arrive; QEMU restores it without multifd and the file
    reads back to the captured digests."""
    require_method("zstd")
    src = lab.source(machine="q35", paused=False)
    out = lab.workdir / "live.mr"
    cap, uri = start_capture(channels=2, method="zstd", mapped_ram=out)
    src.set_migration(channels=2, compression="zstd")
    src.migrate(uri)
    result = cap.result(60)
    src.stop()
    assert result["file"] == str(out) and out.exists()
    assert not out.with_name("live.mr.partial").exists()
    assert not (cap.cap.out_dir / "manifest.json").exists()
    back = import_file(out, lab.workdir / "back")
    assert [block_digest(b) for b in back["blocks"]] == [block_digest(b) for b in result["blocks"]]
    dst = lab.destination(machine="q35")
    restore(dst, out, None)
    assert_same_ram(dst.config.ram_file, src.config.ram_file, running=True)


# ---------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def qemu_file(tmp_path_factory: pytest.TempPathFactory, pattern_file: Path) -> Iterator[Path]:
    """One file saved by QEMU (pc, paused, multifd 2) for the bad-file cases."""
    require_qemu()
    work = tmp_path_factory.mktemp("mapped-ram")
    lab = Lab(work, pattern_file, [])
    try:
        src = lab.source()
        save(src, work / "good.mr", 2)
    finally:
        for vm in lab.vms:
            vm.stop(timeout=3)
    yield work / "good.mr"


def _edit(good: Path, out: Path, edit) -> Path:
    data = bytearray(good.read_bytes())
    f = open_mapped_ram(good)
    try:
        data = edit(data, f) or data
    finally:
        f.close()
    out.write_bytes(data)
    return out


def _header(f, i: int = 0) -> int:
    return f.blocks[i].header_offset


def _put(fmt: str, where, value):
    def edit(data: bytearray, f) -> None:
        struct.pack_into(fmt, data, where(f), value)
    return edit


BAD = [
    ("truncated-pages", lambda d, f: d[: f.blocks[0].header.pages_offset + 0x100000],
     re.escape("pages offset outside the file [field pages_offset")),
    ("truncated-tail", lambda d, f: d[:-100], "truncated or damaged stream: the device tail"),
    ("truncated-stream", lambda d, f: d[: f.blocks[-1].header.end(0x1000) + 20],
     "truncated or damaged stream: main stream ended early"),
    ("version", _put(">I", _header, 2),
     re.escape("unknown version [field version: received 2, expected 1]")),
    ("page-size", _put(">Q", lambda f: _header(f) + 4, 8192),
     re.escape("page size mismatch [field page_size: received 8192, expected 4096]")),
    ("bitmap-offset", _put(">Q", lambda f: _header(f) + 12, 1 << 40),
     re.escape("bitmap offset outside the file [field bitmap_offset: received 0x10000000000")),
    ("pages-offset", _put(">Q", lambda f: _header(f) + 20, 1 << 40),
     re.escape("pages offset outside the file [field pages_offset: received 0x10000000000")),
    # MEM_SIZE claims one page more than the blocks listed: the entry after the last block is
    # the RAM START's EOS record, read as a block with an empty name.
    ("block-missing", _put(">Q", lambda f: _header(f) - 4 - 8 - 8, 0x4083000 | 4),
     'Unknown ramblock "" in the MEM_SIZE list .*a block is missing'),
    # pc.rom renamed "mem": a second block of that name, which no destination could place.
    ("block-unknown", lambda d, f: _rename(d, f, 3, b"mem"), "ramblock mem listed twice"),
]


def _rename(data: bytearray, f, index: int, name: bytes) -> None:
    """Give block ``index`` a shorter ``name``; its length and header move up (the header's
    offsets are absolute, so the bitmap and pages stay where they are)."""
    old = f.blocks[index].info.name.encode()
    at = _header(f, index) - 8 - len(old) - 1
    rest = bytes(data[at + 1 + len(old) : _header(f, index) + 28])
    data[at : at + 1 + len(name) + len(rest)] = bytes([len(name)]) + name + rest


@pytest.mark.parametrize("name, edit, match", BAD, ids=[b[0] for b in BAD])
def test_bad_files(qemu_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   name: str, edit, match: str) -> None:
    """`qemu import` of a damaged file: one line naming the field, non-zero exit, no
    manifest and no partial files left."""
    bad = _edit(qemu_file, tmp_path / f"{name}.mr", edit)
    out = tmp_path / "out"
    assert main(["qemu", "import", str(bad), "--out", str(out)]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(match, lines[0]), lines[0]
    assert str(bad) in lines[0]
    assert not (out / "manifest.json").exists()
    assert not [p for p in (out.iterdir() if out.exists() else []) if p.suffix == ".partial"]


def test_cli_import_export(qemu_file: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The console commands: import writes a capture directory, export a file that reads
    back to the same blocks; a capture directory missing a block file is refused."""
    cap = tmp_path / "cap"
    cli = [sys.executable, "-m", "multifd_core.cli", "qemu"]
    r = subprocess.run([*cli, "import", str(qemu_file), "--out", str(cap), "-j", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "imported pc-i440fx-10.0 from" in r.stdout
    out = tmp_path / "again.mr"
    assert main(["qemu", "export", str(cap), str(out)]) == 0
    assert "zero pages left out" in capsys.readouterr().out
    back = import_file(out, tmp_path / "back")
    assert [block_digest(b) for b in back["blocks"]] == \
        [block_digest(b) for b in load_capture(cap).manifest["blocks"]]
    broken = tmp_path / "broken"
    shutil.copytree(cap, broken)
    os.unlink(broken / back["blocks"][2]["file"])
    assert main(["qemu", "export", str(broken), str(tmp_path / "x.mr")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pc.bios" in err[0], err
    assert not (tmp_path / "x.mr").exists() and not (tmp_path / "x.mr.partial").exists()
