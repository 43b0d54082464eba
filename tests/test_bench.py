"""``multifd bench --quick`` end to end (16 MiB image), the auto method choice, the link probe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.bench_link import probe_receive, probe_send
from multifd_core.engine.ram import RamBlock
from multifd_core.image import fill_mixed
from multifd_core.methods.registry import default_registry
from multifd_core.session.auto import Candidate, predict_best
from multifd_core.testing import require

REPO = Path(__file__).resolve().parents[1]
CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "multifd_core.cli", "bench", "--quick",
                           "--size-mib", "16", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "physical limits" in proc.stdout and "load average" in proc.stdout
    return json.loads(out.read_text())


def _side_ok(side: dict[str, Any]) -> None:
    assert side["cpu_s"] > 0
    assert side["maxrss_kib"] > 0
    assert 0 < side["rss_anon_peak_kib"] < side["maxrss_kib"]


def test_quick_bench_json_shape(quick: dict[str, Any]) -> None:
    assert quick["version"] == 1
    assert len(quick["host"]["loadavg_start"]) == 3 and len(quick["host"]["loadavg_end"]) == 3
    assert quick["image"]["size_mib"] == 16
    lim = quick["limits"]
    for key in ("memcopy_bytes_per_s", "first_touch_anon_bytes_per_s",
                "first_touch_file_bytes_per_s", "zero_scan_bytes_per_s"):
        assert lim[key] > 0, key
    assert set(lim["socket_loopback"]) == {"1", "4"}
    runs = quick["runs"]
    assert {r["method"] for r in runs} >= {"none"} and len(runs) >= 2
    for r in runs:
        assert "error" not in r, r
        assert r["transfer_s"] > 0 and r["ram_bytes"] == 16 << 20
        assert r["ram_gb_s"] == pytest.approx(r["ram_bytes"] / r["transfer_s"] / 1e9, rel=0.01)
        assert r["wire_bytes"] > 0 and r["ratio"] > 0
        _side_ok(r["sender"])
        _side_ok(r["receiver"])
    none = next(r for r in runs if r["method"] == "none")
    assert none["ratio"] == pytest.approx(1.0)
    assert none["zero_pages"] > 0 and none["normal_pages"] > 0


def test_quick_bench_rss_scaling(quick: dict[str, Any]) -> None:
    rss = quick["rss"]
    assert rss["sizes_mib"] == [16, 64]
    small, big = rss["runs"]
    assert big["ram_bytes"] == 4 * small["ram_bytes"]
    # ru_maxrss counts mapped file pages and grows with the image; RssAnon must not
    assert rss["sender_maxrss_kib_ratio"] > 1.2
    assert rss["anon_within_10pct"] is True


def test_quick_bench_links(quick: dict[str, Any]) -> None:
    links = quick["links"]
    if "skipped" in links:  # the link emulation needs root (network namespaces, tc)
        assert os.geteuid() != 0, links["skipped"]
        require(False, f"link runs skipped: {links['skipped']} (run as root, as CI does)")
    (entry,) = links["links"]
    assert entry["rate"] == "1gbit"
    assert 50e6 < entry["probe"]["bytes_per_s"] < 130e6  # tbf at 1 Gbit/s
    assert all("error" not in r for r in entry["runs"])
    auto = entry["auto"]
    assert auto["choice"] in {c["label"] for c in auto["candidates"]}
    assert "fastest_measured" in auto and "regret" in auto


def test_charts_from_quick_result(quick: dict[str, Any], tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if CI:
            raise
        pytest.skip("charts need matplotlib: pip install matplotlib")
    from benchmarks.bench_charts import draw_charts

    paths = draw_charts(quick, str(tmp_path))
    assert len(paths) >= 2
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mixed_block() -> RamBlock:
    ram = np.zeros(8 << 20, dtype=np.uint8)
    fill_mixed(ram.reshape(-1, 4096), seed=5)
    return RamBlock("pc.ram", ram)


def test_auto_prefers_compression_on_a_slow_link(mixed_block: RamBlock) -> None:
    cands = [Candidate("none"), Candidate("zlib", 1)]
    require("zlib" in default_registry(), "needs the zlib plugin: pip install -e plugins/zlib")
    name, report = predict_best([mixed_block], default_registry(), 2, 1e6, candidates=cands)
    assert name == "zlib" and report["choice"] == "zlib:1"
    assert report["sample"]["normal_fraction"] == pytest.approx(0.6, abs=0.05)
    preds = {c["label"]: c for c in report["candidates"]}
    assert preds["zlib:1"]["ratio"] > 1.2 and preds["none"]["ratio"] == pytest.approx(1.0)
    assert preds["none"]["bound"] == "link"


def test_auto_prefers_none_on_a_fast_link(mixed_block: RamBlock) -> None:
    require("zlib" in default_registry(), "needs the zlib plugin: pip install -e plugins/zlib")
    cands = [Candidate("zlib", 1), Candidate("none")]
    name, report = predict_best([mixed_block], default_registry(), 2, 1e12, candidates=cands)
    assert name == "none"
    assert report["candidates"][-1]["label"] == "zlib:1"
    assert report["candidates"][-1]["bound"] == "sender"


def test_link_probe_counts_every_byte() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    got: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: got.update(
        r=probe_receive([b for _, b in pairs])))
    reader.start()
    sent = probe_send([a for a, _ in pairs], 0.2)
    reader.join(10)
    n, seconds = got["r"]
    assert n == sent > 0 and seconds > 0
    for a, b in pairs:
        a.close()
        b.close()


def test_auto_never_prefers_a_method_that_does_not_compress(mixed_block: RamBlock) -> None:
    from multifd_core.session.auto import Prediction, _dominated_by_none

    def pred(label: str, ratio: float, seconds: float) -> Prediction:
        return Prediction(label, label, None, None, ratio, 1e9, 1e9, 1, seconds, seconds,
                          seconds, seconds, "link")

    rows = [pred("none", 1.0, 1.0), pred("raw", 0.999, 0.5), pred("zstd", 1.5, 0.8)]
    assert _dominated_by_none(rows) == {"raw"}
    assert _dominated_by_none(rows[1:]) == set()


def _trial(qemu: int, capture: int, replay: int, native: int, durable: int) -> dict[str, Any]:
    return {"qemu_to_qemu": {"total_ms": qemu},
            "qemu_to_capture": {"total_ms": capture - 100, "wall_ms": capture},
            "replay_to_qemu": {"total_ms": replay}, "native": {"total_ms": native},
            "durable_limit": {"total_ms": durable}}


def test_qemu_cells_give_median_ratios_and_flag_a_loaded_machine(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The ratios are medians of each trial's own ratio; QEMU->QEMU trials far apart mark
    the cell, since its denominator then moves more than what is measured."""
    from benchmarks.bench_qemu import print_cells, summarize

    quiet = summarize("none", 4, [_trial(300, 900, 450, 800, 600),
                                  _trial(280, 1000, 400, 780, 620),
                                  _trial(320, 950, 480, 900, 640)])
    assert quiet["qemu_range_ms"] == [280, 320]
    # capture: 900/600, 1000/620, 950/640 -> median 1.5; replay: 1.5, 1.43, 1.5 -> 1.5
    assert quiet["ratios"] == {"capture": 1.5, "native": 1.33, "replay": 1.5}
    loaded = summarize("none", 2, [_trial(270, 900, 450, 800, 600),
                                   _trial(1600, 1000, 400, 780, 620)])
    print_cells([quiet, loaded], 3)
    out = capsys.readouterr().out
    assert "QEMU->QEMU trials took 270-1600 ms (5.9x apart)" in out
    assert "280-320" not in out


def test_warm_up_touches_and_frees_every_page_it_is_asked_for() -> None:
    """The warm-up before a timed step makes its memory resident (the peak RSS grows by the
    size asked for) and frees it again (the RSS after is back down); 0 GiB: no warm-up."""
    code = ("import resource, os\n"
            "from benchmarks.warm import warm_memory\n"
            "assert warm_memory(0) is None\n"
            "cost = warm_memory(0.25)\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10\n"
            "rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            "print(cost, peak, rss)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cost, peak, rss = proc.stdout.split()
    assert float(cost) > 0
    assert int(peak) >= 256 << 20, f"peak RSS {int(peak) >> 20} MiB: the pages were not touched"
    assert int(rss) < 200 << 20, f"RSS {int(rss) >> 20} MiB after: the memory was not freed"


def test_qemu_cells_report_what_the_warm_ups_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Each step's warm-up cost per page is kept, and the table gives its range."""
    from benchmarks.bench_qemu import print_cells, summarize

    trials = [_trial(300, 900, 450, 800, 600), _trial(280, 1000, 400, 780, 620)]
    for n, trial in enumerate(trials):
        for step, cost in zip(trial, (1.5, 2.0, 9.5, 3.0, 1.8), strict=True):
            trial[step]["warm_us"] = cost + n
    cell = summarize("none", 4, trials)
    assert cell["warm_us_per_page"] == [1.5, 10.5]
    print_cells([cell], 2, 2.0)
    assert "after 2 GiB of fresh memory was touched and freed, at 1.5-10.5 us per page" in (
        capsys.readouterr().out)
    print_cells([summarize("none", 4, [_trial(300, 900, 450, 800, 600)])], 1)
    assert "no warm-up before the timed steps" in capsys.readouterr().out
