"""A short soak: five consecutive sessions through one long-running listener must not leak
file descriptors, threads or memory (python -m benchmarks.soak runs the long version; run in its
own process, since it pins glibc's mmap threshold)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.parametrize("output", ["memory", "files"])
def test_five_migrations_leak_nothing(output: str, tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(SOAK), "--runs", "5", "--size-mib", "16",
                           "--output", output, "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(path.read_text())
    growth = report["growth"]
    assert report["runs"] == 5, report
    assert growth["fds"] == 0, report
    assert growth["threads"] == 0 and growth["python_threads"] == 0, report
    assert growth["rss_kib"] < 8 * 1024, report  # noise, not 16 MiB a run
