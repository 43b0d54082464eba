"""``auto`` counts the CPUs this process may use: affinity, capped by a cgroup quota."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multifd_core.session.cpus import cgroup_quota, usable_cpus


def test_affinity_counts(tmp_path: Path) -> None:
    """A process pinned to one CPU counts one, whatever the machine has."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell affinity from the machine's count")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from multifd_core.session.cpus import usable_cpus; "
            f"print(usable_cpus(cgroup_root={str(tmp_path)!r}), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert float(out[0]) == 1.0 and int(out[1]) >= 2


def tree(root: Path, files: dict[str, str]) -> tuple[str, str]:
    """Write ``files`` (path under ``root`` -> text); return the proc and cgroup roots."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(root / "proc"), str(root / "cg")


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {"proc/cgroup": "0::/machine.slice/box\n",
                                 "cg/cpu.max": "max 100000\n",
                                 "cg/machine.slice/cpu.max": "300000 100000\n",
                                 "cg/machine.slice/box/cpu.max": "150000 100000\n"})
    assert cgroup_quota(proc, root) == 1.5
    assert usable_cpus(proc, root) == min(1.5, len(os.sched_getaffinity(0)))
    tree(tmp_path, {"cg/machine.slice/box/cpu.max": "max 100000\n"})
    assert cgroup_quota(proc, root) == 3.0


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    proc, root = tree(tmp_path, {
        "proc/cgroup": "5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n",
        "cg/cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000\n",
        "cg/cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
        "cg/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(proc, root) == 0.5
    assert usable_cpus(proc, root) == 0.5


def test_no_cgroup_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(str(tmp_path / "none"), str(tmp_path)) is None
    assert usable_cpus(str(tmp_path / "none"), str(tmp_path)) == len(os.sched_getaffinity(0))


def test_auto_uses_the_usable_count() -> None:
    """``--compression auto`` predicts with the CPUs the process may use (pinned: one)."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "import numpy as np\n"
            "from multifd_core.session.auto import predict_best\n"
            "from multifd_core.engine.ram import RamBlock\n"
            "from multifd_core.methods.registry import MethodRegistry\n"
            "block = RamBlock('pc.ram', np.ones(1 << 20, dtype=np.uint8))\n"
            "_, report = predict_best([block], MethodRegistry(entry_points=False), 4, 1e9)\n"
            "print(report['cores'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert float(out) <= 1.0
