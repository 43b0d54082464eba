"""CPU time of the calling thread, user and system apart (what the engine itself costs)."""

from __future__ import annotations

import os
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu() -> tuple[float, float]:
    """(user, system) CPU seconds of the calling thread (Linux; zeros elsewhere)."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime


def charge(stats: Any, since: tuple[float, float]) -> None:
    """Add the calling thread's CPU time since ``since`` to ``stats`` (a ``ChannelStats``)."""
    user, system = thread_cpu()
    stats.user_seconds += user - since[0]
    stats.system_seconds += system - since[1]
