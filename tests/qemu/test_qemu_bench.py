"""``multifd bench --quick --qemu``: the QEMU rows against a real QEMU, every way to move the
same guest RAM in one run (QEMU->QEMU, capture, replay, native send, the durable limit), with
the medians and ratios the performance targets are read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from qemu_support import require_qemu

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_quick_qemu_rows_hold_every_wall_and_ratio(tmp_path: Path) -> None:
    require_qemu()
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "multifd_core.cli", "bench", "--quick",
                           "--qemu", "--sections", "qemu", "--no-link", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    q = json.loads(out.read_text())["qemu"]
    assert q["repeat"] == 1
    assert q["warm_gib"] == 0  # --quick is a smoke run: no warm-up before its steps
    cells = [r for r in q["rows"] if "ratios" in r]
    assert {r["method"] for r in cells} >= {"none", "zstd"}
    for r in cells:
        assert r["errors"] == [], r["errors"]
        assert len(r["trials"]) == 1
        for key in ("qemu_ms", "durable_ms", "capture_src_ms", "capture_wall_ms",
                    "native_wall_ms", "native_transfer_ms", "replay_wall_ms"):
            assert r[key] > 0, (r["method"], key)
        # A wall includes the transfer: the capture's from QEMU's migrate to its exit.
        assert r["capture_wall_ms"] >= r["capture_src_ms"]
        assert r["native_wall_ms"] > r["native_transfer_ms"]
        base = max(r["qemu_ms"], r["durable_ms"])
        assert r["ratios"]["capture"] == pytest.approx(r["capture_wall_ms"] / base, abs=0.01)
        assert r["ratios"]["native"] == pytest.approx(r["native_wall_ms"] / base, abs=0.01)
        assert r["ratios"]["replay"] == pytest.approx(r["replay_wall_ms"] / r["qemu_ms"],
                                                      abs=0.01)
        phases = r["trials"][0]["replay_to_qemu"]["phases"]
        assert list(phases) == ["connecting", "transferring", "verifying", "device state"]
    table = proc.stdout[proc.stdout.index("QEMU (pc"):]
    assert "native" in table and "durable" in table and "median" in table


def test_bench_guest_ram_is_anonymous(tmp_path: Path) -> None:
    """The bench's guests have ordinary anonymous RAM, as a VM's ``-m`` gives: no RAM file,
    whose never-written pages QEMU's source would read through the page cache."""
    require_qemu()
    from benchmarks.bench_qemu import Bench
    from multifd_core.image import write_mixed_image

    blob = tmp_path / "mixed.bin"
    write_mixed_image(blob, 1 << 20)
    vm = Bench(tmp_path, 64, blob, warm_gib=0).vm("src")
    try:
        assert vm.proc is not None
        memdevs = vm.qmp.execute("query-memdev")
        assert [(m["id"], m["size"]) for m in memdevs] == [("mem", 64 << 20)]
        maps = Path(f"/proc/{vm.proc.pid}/maps").read_text()
        assert ".ram" not in maps and not list(tmp_path.glob("*.ram"))
    finally:
        vm.stop()
