"""A one-line progress display for either end of a session (stderr, on a terminal).

It shows the phase (waiting, connecting, negotiating, transferring, syncing, verifying), the
share of RAM moved, the rate and the time left. The rate is RAM bytes over the transfer's time;
once every byte is in, or the transfer phase ended, it is frozen, so hashing and syncing
afterwards do not make it fall.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO

#: Phases during which bytes move.
TRANSFER = "transferring"


class Progress:
    """Call ``phase(name)`` as the session moves on, ``measure(total, done)`` once the total is
    known (``done()`` returns the RAM bytes moved so far), ``close()`` at the end."""

    def __init__(self, label: str, *, enabled: bool, stream: IO[str] | None = None,
                 interval: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.enabled, self.interval, self.clock = label, enabled, interval, clock
        self.stream = stream if stream is not None else sys.stderr
        self.total = 0
        self._done: Callable[[], int] | None = None
        self._phase = "starting"
        self._started: float | None = None  # transfer start
        self._frozen: float | None = None  # the final rate, once the transfer is over
        self._width = 0
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="multifd-progress",
                                            daemon=True)
            self._thread.start()

    def phase(self, name: str) -> None:
        with self._lock:
            if name == TRANSFER and self._started is None:
                self._started = self.clock()
            elif self._phase == TRANSFER and name != TRANSFER:
                self._freeze()
            self._phase = name
        self._render()

    def measure(self, total: int, done: Callable[[], int]) -> None:
        with self._lock:
            self.total, self._done = total, done

    def rate(self) -> tuple[float, int]:
        """(bytes per second, bytes done): frozen at the end of the transfer."""
        with self._lock:
            done = self._done() if self._done is not None else 0
            if self._frozen is None and self.total and done >= self.total:
                self._freeze(done)
            if self._frozen is not None:
                return self._frozen, done
            if self._started is None:
                return 0.0, done
            return done / max(self.clock() - self._started, 1e-6), done

    def line(self) -> str:
        """The current status text."""
        rate, done = self.rate()
        frac = min(done / self.total, 1.0) if self.total else 0.0
        text = f"{self.label} {self._phase:<12}"
        if self.total:
            bar = "#" * int(frac * 24)
            text += (f" [{bar:<24}] {frac * 100:5.1f}%  {done / 2**20:,.1f}/"
                     f"{self.total / 2**20:,.1f} MiB")
        if rate:
            text += f"  {rate / 1e9:.2f} GB/s"
            if self._frozen is None and self.total and done < self.total:
                left = (self.total - done) / rate
                text += f"  ETA {int(left // 60)}:{int(left % 60):02d}"
        return text

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._render()
        with self._write_lock:
            self.stream.write("\n")
            self.stream.flush()

    # ------------------------------------------------------------------ internals

    def _freeze(self, done: int | None = None) -> None:
        """Fix the rate at its value when the transfer ended (lock held)."""
        if self._frozen is not None or self._started is None:
            return
        if done is None:
            done = self._done() if self._done is not None else 0
        self._frozen = done / max(self.clock() - self._started, 1e-6)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._render()

    def _render(self) -> None:
        if not self.enabled:
            return
        text = self.line()
        with self._write_lock:
            pad = max(self._width - len(text), 0)
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
