"""Against a real QEMU >= 10 (64 MiB guests that boot no OS): QEMU->QEMU, QEMU->capture,
capture->replay->QEMU, and the failures that must be clear, leave no manifest and not hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu_support import Lab, assert_same_ram, block_digest, incoming_port, require_method, sha

from multifd_core import wire
from multifd_core.errors import MultiFDError
from multifd_core.qemu.replay import load_capture, replay
from multifd_core.session.transport import parse_address
from multifd_core.testing import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MEM_LEN = 64 << 20


def test_qemu_to_qemu_multifd(lab: Lab) -> None:
    """The fixtures work: a plain QEMU migration, multifd with 2 channels, RAM identical."""
    src = lab.source()
    dst = lab.destination()
    uri = incoming_port(dst, 2)
    src.set_migration(channels=2)
    src.migrate(uri)
    assert src.qmp.wait_migration(timeout=30)["status"] == "completed"
    assert dst.qmp.wait_migration(timeout=30)["status"] == "completed"
    assert sha(src.config.ram_file) == sha(dst.config.ram_file)
    assert dst.status() == "prelaunch"


CASES = [
    # machine, paused, zero-page-detection, channels, method, return path
    ("pc", True, None, 2, "none", False),
    ("q35", False, None, 4, "none", False),
    ("pc", True, "legacy", 1, "none", False),
    ("q35", False, "legacy", 2, "none", False),
    ("pc-i440fx-8.0", True, None, 2, "none", False),
    ("pc-i440fx-8.0", False, None, 1, "none", False),
    ("pc", True, None, 2, "zlib", False),
    ("q35", False, None, 4, "zstd", False),
    ("pc", False, None, 2, "none", True),
]


@pytest.mark.parametrize("machine, paused, zpd, channels, method, rp", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_capture(lab: Lab, start_capture, machine: str, paused: bool, zpd: str | None,
                 channels: int, method: str, rp: bool) -> None:
    if method != "none":
        require_method(method)
    src = lab.source(machine=machine, paused=paused)
    cap, uri = start_capture(channels=channels, method=method)
    src.set_migration(channels=channels, compression=method, zero_page_detection=zpd,
                      return_path=rp)
    src.migrate(uri)
    m = cap.result(60)
    info = src.qmp.wait_migration(timeout=30)
    assert info["status"] == "completed", info
    out = cap.cap.out_dir
    mem = m["blocks"][0]
    assert mem["name"] == "mem" and mem["length"] == MEM_LEN
    assert block_digest(mem) == sha(src.config.ram_file)  # the source's final RAM
    bios = next(b for b in m["blocks"] if b["name"] == "pc.bios")
    dump = lab.workdir / "bios.dump"
    src.qmp.execute("pmemsave", {"val": 0xFFFC0000, "size": 0x40000, "filename": str(dump)})
    assert sha(out / bios["file"]) == sha(dump)
    legacy_zero = zpd == "legacy" or machine == "pc-i440fx-8.0"
    assert m["sync_mode"] == ("per-section" if machine == "pc-i440fx-8.0" else "per-round")
    assert (m["statistics"]["main_zero_pages"] > 0) == legacy_zero
    assert m["switchover_start"] == (machine != "pc-i440fx-8.0")
    assert m["return_path"] == rp
    assert m["machine"].startswith("pc-q35-" if machine == "q35" else "pc-i440fx-")
    assert m["statistics"]["normal_pages"] >= info["ram"]["normal"]
    assert all(c["sync_packets"] == m["statistics"]["sync_rounds"]
               for c in m["statistics"]["channels"])
    assert json.loads((out / "vmdesc.json").read_text())["page_size"] == 4096


@pytest.mark.parametrize("machine, paused, cap_method, rep_method, channels", [
    ("pc", True, "none", "none", 2),
    ("q35", True, "zlib", "zstd", 4),
    ("q35", False, "zstd", "none", 4),
    ("pc-i440fx-8.0", True, "none", "none", 1),
])
def test_capture_then_replay(lab: Lab, start_capture, machine: str, paused: bool,
                             cap_method: str, rep_method: str, channels: int) -> None:
    for m in {cap_method, rep_method} - {"none"}:
        require_method(m)
    src = lab.source(machine=machine, paused=paused)
    cap, uri = start_capture(channels=2, method=cap_method)
    src.set_migration(channels=2, compression=cap_method)
    src.migrate(uri)
    manifest = cap.result(60)
    src.stop()
    dst = lab.destination(machine=machine)
    addr = incoming_port(dst, channels, rep_method)
    capture = load_capture(cap.cap.out_dir)
    try:
        stats = replay(capture, parse_address(addr), channels=channels, method=rep_method,
                       timeout=20)
    finally:
        capture.close()
    assert dst.qmp.wait_migration(timeout=20)["status"] == "completed"
    captured = cap.cap.out_dir / manifest["blocks"][0]["file"]
    assert_same_ram(dst.config.ram_file, captured, running=not paused)
    assert stats.normal_pages + stats.zero_pages == 0x4082000 // 4096
    # The captured runstate travels in globalstate; -S on the destination holds it.
    assert dst.status() == ("prelaunch" if paused else "paused")
    dst.qmp.execute("cont")
    assert dst.status() == "running"


# ---------------------------------------------------------------------- failures


def test_capture_wrong_channel_count(lab: Lab, start_capture) -> None:
    src = lab.source()
    cap, uri = start_capture(channels=2)
    src.set_migration(channels=4)
    src.migrate(uri)
    with pytest.raises(MultiFDError, match="channel id [23] is greater than number of "
                                           "channels 2"):
        cap.result(30)
    assert not (cap.cap.out_dir / "manifest.json").exists()
    assert src.qmp.wait_migration(timeout=30)["status"] in ("failed", "completed")


def test_capture_missing_channel(lab: Lab, start_capture) -> None:
    src = lab.source()
    cap, uri = start_capture(channels=3, channel_grace=2.0)
    src.set_migration(channels=2)
    src.migrate(uri)
    with pytest.raises(MultiFDError, match=r"opened 2 multifd channel\(s\), expected 3"):
        cap.result(30)
    assert not (cap.cap.out_dir / "manifest.json").exists()


def test_capture_wrong_uuid(lab: Lab, start_capture) -> None:
    src = lab.source(uuid="11111111-2222-3333-4444-555555555555")
    cap, uri = start_capture(channels=2, uuid=bytes(16))
    src.set_migration(channels=2)
    src.migrate(uri)
    with pytest.raises(MultiFDError, match="refused.*uuid 11111111-2222-3333-4444-"
                                           "555555555555, expected 00000000.*--uuid"):
        cap.result(30)
    assert not (cap.cap.out_dir / "manifest.json").exists()


def test_strangers_before_the_source_do_not_break_a_capture(lab: Lab, start_capture) -> None:
    """Garbage, an idle connection and a stranger's init packet with another uuid reach the
    capture port before QEMU migrates: each is refused and logged; QEMU's migration
    completes and the capture is whole."""
    src = lab.source()
    cap, uri = start_capture(channels=2, handshake_timeout=2.0)
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    strangers = [socket.create_connection((host, int(port)), timeout=5) for _ in range(3)]
    strangers[0].sendall(b"\xde\xad\xbe\xef" * 32)
    strangers[2].sendall(wire.encode_init(bytes.fromhex("ab" * 16), 0))
    src.set_migration(channels=2)
    src.migrate(uri)
    manifest = cap.result(60)
    assert src.qmp.wait_migration(timeout=30)["status"] == "completed"
    assert manifest["uuid"] == "00000000-0000-0000-0000-000000000000"
    assert any("not a QEMU migration connection" in r for r in cap.cap.rejected)
    for s in strangers:
        s.close()


def test_capture_source_killed(lab: Lab, start_capture) -> None:
    src = lab.source(paused=False)
    cap, uri = start_capture(channels=2, timeout=10.0)
    src.set_migration(channels=2, max_bandwidth=8 << 20)  # 8 MiB/s: several seconds
    src.migrate(uri)
    wait_until(lambda: cap.cap.receiver and any(s.normal_pages for s in cap.cap.receiver.stats),
               "the first multifd pages", timeout=30)  # then kill it mid-migration
    src.kill()
    t0 = time.monotonic()
    with pytest.raises(MultiFDError, match="early|EOF|closed"):
        cap.result(30)
    assert time.monotonic() - t0 < 15
    assert not (cap.cap.out_dir / "manifest.json").exists()


def test_replay_wrong_uuid_and_method(lab: Lab, start_capture) -> None:
    src = lab.source()
    cap, uri = start_capture(channels=2)
    src.set_migration(channels=2)
    src.migrate(uri)
    cap.result(60)
    src.stop()
    capture = load_capture(cap.cap.out_dir)
    try:
        dst = lab.destination(name="dst1", uuid="11111111-2222-3333-4444-555555555555")
        addr = incoming_port(dst, 2)
        t0 = time.monotonic()
        with pytest.raises(MultiFDError):
            replay(capture, parse_address(addr), channels=2, timeout=8)
        assert time.monotonic() - t0 < 20
        info = dst.qmp.wait_migration(timeout=10)
        assert info["status"] == "failed" and "uuid" in info["error-desc"]
        dst.kill()
    finally:
        capture.close()


def test_cli_capture_and_replay(lab: Lab, tmp_path: Path) -> None:
    """The console commands: capture prints its address, exits 0, replay loads the dir."""
    src = lab.source()
    out = tmp_path / "clicap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "multifd_core.cli", "qemu", "capture", "--listen",
         "tcp:127.0.0.1:0", "--channels", "2", "--out", str(out), "--timeout", "20"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        line = proc.stderr.readline()
        assert "listening on tcp:127.0.0.1:" in line
        src.set_migration(channels=2)
        src.migrate(line.split("listening on ")[1].strip())
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "captured pc-i440fx-10.0 (per-round, none, 2 channels)" in stdout
    src.stop()
    dst = lab.destination()
    addr = incoming_port(dst, 2)
    r = subprocess.run([sys.executable, "-m", "multifd_core.cli", "qemu", "replay", str(out),
                        addr, "--channels", "2", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["normal_pages"] > 0
    assert dst.qmp.wait_migration(timeout=20)["status"] == "completed"
    bad = subprocess.run([sys.executable, "-m", "multifd_core.cli", "qemu", "replay",
                          str(tmp_path), addr], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "no manifest.json" in bad.stderr
    # A block that changed after the capture: replay checks the digests while it sends and
    # fails before the device state, so the destination never completes from it.
    ram = out / "000-mem.ram"
    with open(ram, "r+b") as f:
        f.seek(0x100000)  # inside the loaded region: a page the capture holds
        byte = f.read(1)
        f.seek(0x100000)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst2 = lab.destination(name="dst2")
    addr2 = incoming_port(dst2, 2)
    corrupt = subprocess.run([sys.executable, "-m", "multifd_core.cli", "qemu", "replay",
                              str(out), addr2, "--channels", "2"],
                             capture_output=True, text=True, timeout=60)
    assert corrupt.returncode == 1, corrupt.stderr
    assert "000-mem.ram: blake3 differs from the manifest" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr
    assert dst2.qmp.wait_migration(timeout=20)["status"] == "failed"
