"""Does a method's codec release the GIL? A verdict that a loaded machine does not fool.

Two threads, each one channel, encode and decode full packets in a loop (the method's own
hooks, nothing of ours that releases the GIL in between), with the interpreter's switch interval
raised so that the GIL changes hands only where a call releases it, as the kit did before. The
threads measure themselves, window by window (``window`` seconds, from Linux schedstat read
through a libc call that keeps the GIL, so measuring never hands it over):

- **runnable share**: the part of the window the two threads were running or queued for a CPU.
  A thread waiting for the GIL sleeps, so this is 1.0 for codecs that release it and about 0.5
  for codecs that hold it, on a quiet or a busy machine (time queued for a CPU counts as
  runnable);
- **progress of both**: each thread finished at least one packet in the window. A codec that
  holds the GIL never hands it to the other channel, which makes no progress at all (throughput
  does not scale from one thread to two).

A window *votes* "parallel" when the runnable share reaches ``min_runnable`` and both threads
progressed. The windows go through Wald's sequential test (vote rate 0.75 against 0.1; a false
pass at most ``error``, a false failure at most ``error / 10``): it stops as soon as the votes
clearly say one thing, after ``max_windows`` at the latest (then the likelier rate decides).
The CPU time of the two threads over the window (``concurrency``, up to 2.0 on two free CPUs)
is reported as the throughput scaling it allowed, but does not vote: it depends on the load.

Linux only (``/proc/self/task/*/schedstat``); elsewhere ``GilCheckUnavailable`` is raised.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multifd_core.engine.pipeline import BufferSource
from multifd_core.methods.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.methods.hookspecs import bind
from multifd_core.methods.method import Method
from multifd_core.pagekinds import make_pages
from multifd_core.wire import page_count

__all__ = ["GilCheckUnavailable", "GilVerdict", "GilWindow", "gil_runnable", "gil_verdict"]

#: Vote rates the sequential test tells apart (releasing codecs vote "parallel" in most
#: windows, GIL-holding ones in almost none; python -m benchmarks.bench_gil counts the verdicts).
RATE_RELEASES, RATE_HOLDS = 0.75, 0.1
#: The switch interval during the check: no forced hand-over of the GIL while it runs.
SWITCH_INTERVAL = 30.0


class GilCheckUnavailable(OSError):
    """The GIL check cannot run here (no Linux schedstat)."""


@dataclass(frozen=True)
class GilWindow:
    runnable: float  # mean share of the window the two channel threads were runnable
    packets: tuple[int, int]  # packets each thread finished in the window
    concurrency: float  # their CPU seconds per second of the window (0-2 on two CPUs)

    def votes(self, min_runnable: float) -> bool:
        return self.runnable >= min_runnable and min(self.packets) > 0


@dataclass
class GilVerdict:
    """The outcome of ``gil_verdict``: ``releases``, and the windows behind it."""

    releases: bool
    min_runnable: float
    windows: list[GilWindow] = field(default_factory=list)
    decided: bool = False  # the sequential test reached a bound (else: majority at the cap)
    seconds: float = 0.0

    @property
    def votes(self) -> int:
        return sum(w.votes(self.min_runnable) for w in self.windows)

    @property
    def runnable(self) -> float:
        return statistics.median(w.runnable for w in self.windows) if self.windows else 0.0

    @property
    def stalled(self) -> int:
        """Windows in which one of the two channels finished no packet."""
        return sum(min(w.packets) == 0 for w in self.windows)

    @property
    def concurrency(self) -> float:
        return statistics.median(w.concurrency for w in self.windows) if self.windows else 0.0

    def summary(self) -> str:
        how = "" if self.decided else f" (undecided after {len(self.windows)}: likelier rate)"
        return (f"two channels ran in parallel in {self.votes} of {len(self.windows)} windows"
                f"{how}; median runnable share {self.runnable:.2f} (need "
                f"{self.min_runnable:.2f}); one channel made no progress in {self.stalled}; "
                f"median concurrency {self.concurrency:.2f} CPUs")

    def as_dict(self) -> dict[str, Any]:
        return {"releases": self.releases, "windows": len(self.windows), "votes": self.votes,
                "stalled_windows": self.stalled, "decided": self.decided,
                "runnable_median": round(self.runnable, 3),
                "concurrency_median": round(self.concurrency, 3),
                "seconds": round(self.seconds, 3)}


def gil_verdict(make_method: Callable[[], Method], page_size: int = 4096, *,
                min_runnable: float = 0.9, window: float = 0.1, max_windows: int = 24,
                error: float = 1e-3) -> GilVerdict:
    """Whether the codec of ``make_method()`` instances releases the GIL (see the module doc).

    ``make_method`` is called four times (a sender and a receiver per channel)."""
    up = math.log(RATE_RELEASES / RATE_HOLDS)  # a "parallel" vote
    down = math.log((1 - RATE_RELEASES) / (1 - RATE_HOLDS))  # any other
    to_pass, to_fail = math.log(1 / error), math.log(10 / error)
    verdict = GilVerdict(False, min_runnable)
    score = 0.0

    def decide(w: GilWindow) -> bool:
        nonlocal score
        verdict.windows.append(w)
        score += up if w.votes(min_runnable) else down
        if score >= to_pass or score <= -to_fail:
            verdict.decided = True
        return verdict.decided or len(verdict.windows) >= max_windows

    start = time.perf_counter()
    _Run(make_method, page_size, window, decide).run(deadline=60.0 + 4 * window * max_windows)
    verdict.releases = score > 0
    verdict.seconds = time.perf_counter() - start
    return verdict


def gil_runnable(make_method: Callable[[], Method], page_size: int = 4096,
                 seconds: float = 0.4) -> float:
    """The median runnable share of two busy channel threads over ``seconds`` (one measure of
    ``gil_verdict``, for benchmarks that print it)."""
    shares: list[float] = []

    def decide(w: GilWindow) -> bool:
        shares.append(w.runnable)
        return len(shares) >= max(1, round(seconds / 0.1))

    _Run(make_method, page_size, 0.1, decide).run(deadline=60.0 + 4 * seconds)
    return statistics.median(shares)


_pread: Any = None


def _gil_keeping_pread() -> Any:
    """libc's ``pread`` through ``ctypes.PyDLL``: the call keeps the GIL, so sampling never
    hands it to the other channel."""
    global _pread
    if _pread is None:
        fn = ctypes.PyDLL(None).pread
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long]
        fn.restype = ctypes.c_ssize_t
        _pread = fn
    return _pread


class _Schedstat:
    """One thread's ``/proc/self/task/TID/schedstat``, read without releasing the GIL."""

    def __init__(self, tid: int) -> None:
        import os

        path = f"/proc/self/task/{tid}/schedstat"
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise GilCheckUnavailable(f"the GIL check reads {path}, which needs Linux with "
                                      f"schedstat ({exc})") from None
        self.buf = ctypes.create_string_buffer(128)
        self.pread = _gil_keeping_pread()

    def read(self) -> tuple[float, float]:
        """(seconds on a CPU, seconds queued for one)."""
        n = self.pread(self.fd, self.buf, 127, 0)
        if n <= 0:
            raise GilCheckUnavailable(f"reading a channel thread's schedstat failed "
                                      f"(pread returned {n}): did the thread exit?")
        running, queued, _ = self.buf.raw[:n].split()
        return int(running) / 1e9, int(queued) / 1e9

    def close(self) -> None:
        import os

        os.close(self.fd)


class _Run:
    """Two channel threads that sample themselves every ``window`` seconds and hand each
    window to ``decide`` (which returns True to stop)."""

    def __init__(self, make_method: Callable[[], Method], page_size: int, window: float,
                 decide: Callable[[GilWindow], bool]) -> None:
        n = page_count(page_size)
        self.pages = make_pages("text", n, page_size, np.random.default_rng(1))
        self.pages[::4] = make_pages("random", len(self.pages[::4]), page_size,
                                     np.random.default_rng(2))
        self.make, self.window, self.decide = make_method, window, decide
        self.errors: list[BaseException] = []
        self.stats: list[_Schedstat] = []
        self.packets = [0, 0]
        self.done = threading.Event()
        self.ready = threading.Barrier(2)
        self.sampling = threading.Lock()
        self.last: tuple[float, list[tuple[float, float]], list[int]] | None = None

    def run(self, deadline: float) -> None:
        threads = [threading.Thread(target=self._worker, args=(k,), name=f"multifd-gil-{k}",
                                    daemon=True) for k in range(2)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            for t in threads:
                t.start()
            self.done.wait(deadline)
            self.done.set()
            for t in threads:
                t.join(timeout=60.0)
        finally:
            sys.setswitchinterval(interval)
            for st in self.stats:
                st.close()
        if self.errors:
            raise self.errors[0]
        if any(t.is_alive() for t in threads):
            raise GilCheckUnavailable("the GIL check's channel threads did not stop in 60 s")

    def _worker(self, k: int) -> None:
        try:
            pipe = _Pipe(self.make, self.pages)
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.abort()
            self.done.set()
            return
        try:
            pipe.unit()  # first-use allocations happen before the windows
            self.stats.append(_Schedstat(threading.get_native_id()))
            self.ready.wait(timeout=60.0)
            while not self.done.is_set():
                pipe.unit()
                self.packets[k] += 1
                self._maybe_sample()
            pipe.check()
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
            self.ready.abort()
            self.done.set()
        finally:
            pipe.close()

    def _maybe_sample(self) -> None:
        """Close a window when it is due; whichever thread holds the GIL then does it."""
        now = time.perf_counter()
        if self.done.is_set() or (self.last is not None and now - self.last[0] < self.window):
            return  # after the verdict the other thread may be gone: no more samples
        if not self.sampling.acquire(blocking=False):
            return
        try:
            sample = (time.perf_counter(), [st.read() for st in self.stats], list(self.packets))
            if self.last is not None:
                t0, before, p0 = self.last
                wall = sample[0] - t0
                cpu = sum(a[0] - b[0] for a, b in zip(sample[1], before, strict=True))
                queued = sum(a[1] - b[1] for a, b in zip(sample[1], before, strict=True))
                w = GilWindow(runnable=(cpu + queued) / (2 * wall),
                              packets=(sample[2][0] - p0[0], sample[2][1] - p0[1]),
                              concurrency=cpu / wall)
                if self.decide(w):
                    self.done.set()
            self.last = sample
        finally:
            self.sampling.release()


class _Pipe:
    """One channel's send and receive hooks on one packet. Nothing here releases the GIL: the
    payload goes to the receiver as it is (joined when it has several parts) and the decoded
    pages are checked once, at the end."""

    def __init__(self, make_method: Callable[[], Method], pages: np.ndarray) -> None:
        send, recv = make_method(), make_method()
        n, ps = pages.shape
        self.code, self.n, self.ps, self.pages = recv.code, n, ps, pages
        self.send, self.recv = bind(send), bind(recv)
        self.sctx, self.rctx = ChannelContext(0, ps), ChannelContext(0, ps)
        self.send.send_setup(channel=self.sctx)
        self.recv.recv_setup(channel=self.rctx)
        scratch = np.empty(pages.size, dtype=np.uint8)
        self.packet = SendPacket.whole(pages, lambda size: memoryview(scratch)[:size], "gil")
        self.index = np.arange(n, dtype=np.int64)
        self.raw = bytearray(pages.size)  # for methods that read raw pages (none)
        self.last: Any = None
        self.count = 0

    def unit(self) -> None:
        parts = self.send.send_prepare(channel=self.sctx, packet=self.packet)
        wire = memoryview(parts[0] if len(parts) == 1 else b"".join(parts)).cast("B")
        self.count += 1

        packet = RecvPacket(
            channel_id=0, packet_num=self.count, flags=self.code, normal_pages=self.n,
            next_packet_size=len(wire), page_size=self.ps, source=BufferSource(wire),
            target=self, index=self.index)
        self.recv.recv(channel=self.rctx, packet=packet)

    # A PageTarget that keeps the decoded pages without copying them (no GIL release).
    def write_pages(self, index: np.ndarray, data: Any) -> None:
        self.last = data

    def page_views(self, index: np.ndarray) -> list[memoryview]:
        self.last = self.raw
        return [memoryview(self.raw)]

    def check(self) -> None:
        got = np.frombuffer(self.last, dtype=np.uint8)
        if not np.array_equal(got, self.pages.reshape(-1)):
            raise AssertionError("pages differ after the timed round trips")

    def close(self) -> None:
        self.send.send_cleanup(channel=self.sctx)
        self.recv.recv_cleanup(channel=self.rctx)
