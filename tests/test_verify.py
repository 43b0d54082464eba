"""`multifd verify DIR`, and a manifest checked by a standard tool without multifd's code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from netkit import free_port, one_line_error

from multifd_core.testing import require

CLI = [sys.executable, "-m", "multifd_core.cli"]


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real recv output: two blocks sent over loopback."""
    tmp = tmp_path_factory.mktemp("verify")
    rng = np.random.default_rng(3)
    ram, bios = tmp / "ram.img", tmp / "bios.img"
    pages = rng.integers(0, 255, (256, 4096), np.uint8)
    pages[::3] = 0
    ram.write_bytes(pages.tobytes())
    bios.write_bytes(rng.integers(0, 255, 16 * 4096, np.uint8).tobytes())
    addr = f"tcp:127.0.0.1:{free_port()}"
    out = tmp / "out"
    recv = subprocess.Popen([*CLI, "recv", "--listen", addr, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    send = subprocess.run([*CLI, "send", f"pc.ram={ram}", f"pc.bios={bios}", addr,
                           "--connect-timeout", "20"], capture_output=True, text=True,
                          timeout=60)
    _, err = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, (send.stderr, err)
    return out


def test_verify_passes_on_a_fresh_result(received: Path) -> None:
    proc = subprocess.run([*CLI, "verify", str(received), "--json"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and len(report["checks"]) == 2
    assert all(c["detail"].startswith("blake3 ") for c in report["checks"])


def test_verify_names_a_changed_byte(received: Path, tmp_path: Path) -> None:
    copy = tmp_path / "out"
    shutil.copytree(received, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = copy / manifest["blocks"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[4096 + 17] ^= 0x40
    victim.write_bytes(data)
    proc = subprocess.run([*CLI, "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    one_line_error(proc.stderr, "1 of 2 files", manifest["blocks"][0]["file"], "blake3")
    assert f"BAD  {manifest['blocks'][0]['file']}" in proc.stdout


def test_b3sum_checks_the_manifest_without_multifd(received: Path) -> None:
    """The documented format: each block's ``blake3`` is what ``b3sum FILE`` prints."""
    require(shutil.which("b3sum") is not None,
            "b3sum not installed: apt-get install b3sum (scripts/setup-system.sh does)")
    manifest = json.loads((received / "manifest.json").read_text())
    assert manifest["digest"] == "blake3"
    for entry in manifest["blocks"]:
        out = subprocess.run(["b3sum", str(received / entry["file"])], capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[0] == entry["blake3"]
