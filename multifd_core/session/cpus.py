"""How many CPUs this process can use: its affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the machine's CPUs; a process pinned with ``taskset`` or run in a
container with ``--cpus 1.5`` gets fewer, and predictions that assume the machine's count
overrate the compressing methods.
"""

from __future__ import annotations

import os


def usable_cpus(proc_self: str = "/proc/self", cgroup_root: str = "/sys/fs/cgroup") -> float:
    """The CPUs this process may run on (``sched_getaffinity``), capped by the tightest CPU
    quota of its cgroup and their ancestors (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); a fraction when the quota is one. The roots are parameters so a
    test can build a tree."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    quota = cgroup_quota(proc_self, cgroup_root)
    return max(min(cpus, quota), 0.01) if quota is not None else cpus


def cgroup_quota(proc_self: str = "/proc/self",
                 cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup path, or None for none."""
    try:
        with open(os.path.join(proc_self, "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2
            limits += _walk(cgroup_root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                base = os.path.join(cgroup_root, mount)
                if os.path.isdir(base):
                    limits += _walk(base, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _walk(base: str, path: str, limit: object) -> list[float]:
    """The limits found from ``base/path`` up to ``base``."""
    out = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        found = limit(os.path.join(base, *parts[:depth]))  # type: ignore[operator]
        if found is not None:
            out.append(found)
    return out


def _v2_limit(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.max")) as f:
            quota, period = (f.read().split() + ["100000"])[:2]
    except OSError:
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_limit(folder: str) -> float | None:
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
