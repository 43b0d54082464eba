"""What a session tells its user: each side's method and engine, per-channel statistics and
phase timings, as one-line texts for ``-v`` logs and the summaries.

A side's description (``side``) is the dict both ends exchange (protocol ``SIDE_KEYS``):
method, level, engine, kind, library, library_version and path (``native`` or ``fallback``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from multifd_core.methods.method import Method


def describe(method: Method) -> dict[str, Any]:
    """The description of the engine ``method`` runs here (a receiver's method has the
    sender's level)."""
    info = method.engine_info()
    return {"method": method.name, "level": method.level,
            "engine": info.name, "kind": info.kind, "library": info.library,
            "library_version": info.library_version, "path": info.path or None}


def side_text(side: Mapping[str, Any] | None) -> str:
    """``zstd level 1, engine software (software; zstd 1.5.5; native)``, or why not known."""
    if not side:
        return "not reported (an older peer)"
    level = f" level {side['level']}" if side.get("level") is not None else ""
    lib = " ".join(str(side[k]) for k in ("library", "library_version") if side.get(k))
    parts = [side.get("kind") or "?", lib, side.get("path") or "path not stated"]
    return (f"{side.get('method')}{level}, engine {side.get('engine')} "
            f"({'; '.join(p for p in parts if p)})")


def log_channels(log: logging.Logger, stats: Sequence[Any]) -> None:
    """One INFO line per channel: packets, pages and bytes it moved."""
    for i, st in enumerate(stats):
        log.info("channel %d: %d packets + %d syncs, %d normal + %d zero pages, payload %d B, "
                 "wire %d B", i, st.packets, st.sync_packets, st.normal_pages, st.zero_pages,
                 st.payload_bytes, st.wire_bytes)


class Phases:
    """The phases of one session end (``waiting``, ``connecting``, ``negotiating``,
    ``transferring``, ``syncing``, ``verifying``): their durations, an INFO line per phase
    when it ends, and a listener told of each new phase (the progress line). Thread-safe."""

    def __init__(self, log: logging.Logger,
                 listener: Callable[[str], None] | None = None) -> None:
        self.log, self.listener = log, listener
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._name: str | None = None
        self._start = 0.0

    def enter(self, name: str) -> None:
        with self._lock:
            self._close()
            self._name, self._start = name, time.perf_counter()
        if self.listener is not None:
            self.listener(name)

    def finish(self) -> dict[str, float]:
        """End the current phase; log every phase's time on one line; return them."""
        with self._lock:
            self._close()
            self._name = None
            times = {k: round(v, 4) for k, v in self.seconds.items()}
        self.log.info("phases: %s", ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
        return times

    def _close(self) -> None:
        if self._name is not None:
            took = time.perf_counter() - self._start
            self.seconds[self._name] = self.seconds.get(self._name, 0.0) + took
            self.log.debug("%s took %.3f s", self._name, took)
