"""``multifd bench`` for a vendor: the engines of one method, from the package alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multifd_core import bench, cli


@pytest.fixture
def no_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As from an installed wheel: no benchmarks/ directory beside the package."""
    monkeypatch.setattr(bench, "BENCHMARKS", tmp_path / "no-checkout" / "benchmarks")


def test_vendor_bench_runs_without_a_checkout(no_checkout, tmp_path, capsys):
    out = tmp_path / "vendor.json"
    rc = cli.main(["bench", "--methods", "lz4", "--engines", "liblz4,python-lz4",
                   "--size-mib", "2", "--threads", "1", "2", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "migrate liblz4 -> python-lz4" in printed and "GIL: released" in printed
    report = json.loads(out.read_text())
    assert report["kind"] == "vendor" and report["size_mib"] == 2
    (lz4,) = report["methods"]
    assert [e["engine"] for e in lz4["engines"]] == ["liblz4", "python-lz4"]
    for e in lz4["engines"]:
        assert [c["threads"] for c in e["codec"]] == [1, 2]
        assert all(c["encode_mib_s"] > 0 and c["decode_mib_s"] > 0 for c in e["codec"])
        assert e["gil"]["releases"] is True and e["gil"]["windows"] >= 4  # 4: the fastest pass
    pairs = {(p["sender"], p["receiver"]): p for p in lz4["pairs"]}
    assert len(pairs) == 4 and all(p["identical"] for p in pairs.values())
    assert all(0 < p["wire_ratio"] < 1 for p in pairs.values())


def test_bench_without_a_checkout_says_so_in_one_line(no_checkout, capsys):
    rc = cli.main(["bench", "--methods", "zlib", "--size-mib", "1", "--threads", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err == ("multifd bench: no source checkout (benchmarks/ not found): running the "
                   "vendor benchmark only\n")


def test_suite_options_without_a_checkout_are_one_line_errors(no_checkout, capsys):
    assert cli.main(["bench", "--qemu", "--charts", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("multifd: error: --charts, --qemu: the full suite needs the source "
                          "checkout's benchmarks/") and "\n" not in err


def test_unknown_engine_names_the_engines(capsys):
    assert cli.main(["bench", "--methods", "lz4", "--engines", "iaa"]) == 1
    assert "method lz4 has no engine 'iaa'; engines: liblz4, python-lz4" in \
        capsys.readouterr().err
