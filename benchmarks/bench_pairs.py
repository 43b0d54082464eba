"""One migration between two ``multifd`` processes, with each side's CPU time and memory.

``run_procs`` starts ``multifd recv`` and ``multifd send --json`` as separate processes (each
optionally inside a network namespace via ``ip netns exec``, which execs in place so the pid is
the interpreter's), reaps each with ``os.wait4`` for its own rusage (user + system CPU seconds,
``ru_maxrss``), and samples ``/proc/PID/status`` every ``SAMPLE_S`` for the peak ``RssAnon``
(heap, stacks, socket buffers in user space) and ``RssFile`` (mapped file pages: the sender's
mapped image, the receiver's sparse output files). ``ru_maxrss`` counts both kinds, so it grows
with the image size even when the engine's own memory does not.

Each side is started through a tiny launcher process (``_LAUNCH``, a bare interpreter with no
imports beyond ``os``): Linux carries the pre-``exec`` memory's high-water mark into a process's
``ru_maxrss``, so a child forked straight from this (large) process would report at least this
process's peak RSS. The launcher reaps the side with ``os.wait4`` and writes its rusage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import free_port
from multifd_core.errors import MultiFDError

SAMPLE_S = 0.02
LOOPBACK = "127.0.0.1"


@dataclass
class ProcStats:
    """What one side cost: CPU seconds, peak RSS (KiB) by the kernel and by sampling."""

    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    maxrss_kib: int = 0
    rss_anon_peak_kib: int = 0
    rss_file_peak_kib: int = 0
    returncode: int | None = None

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    def as_dict(self) -> dict[str, Any]:
        return {"cpu_s": round(self.cpu_s, 3), "cpu_user_s": round(self.cpu_user_s, 3),
                "cpu_sys_s": round(self.cpu_sys_s, 3), "maxrss_kib": self.maxrss_kib,
                "rss_anon_peak_kib": self.rss_anon_peak_kib,
                "rss_file_peak_kib": self.rss_file_peak_kib}


#: argv: REPORT_PATH CMD...; writes the child's pid, then its exit status and rusage.
_LAUNCH = r"""
import os, sys
report, cmd = sys.argv[1], sys.argv[2:]
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
with open(report, "w") as f:
    f.write(f"{pid}\n"); f.flush()
    _, status, ru = os.wait4(pid, 0)
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_utime} {ru.ru_stime} {ru.ru_maxrss}\n")
"""


@dataclass
class _Watched:
    """One side: its launcher, the launcher's report file, and what was measured."""

    launcher: subprocess.Popen[bytes]
    report: str
    pid: int = 0
    stats: ProcStats = field(default_factory=ProcStats)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def returncode(self) -> int | None:
        return self.stats.returncode


def _launch(cmd: list[str], report: str, stdout: Any, stderr: Any) -> _Watched:
    launcher = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, report, *cmd],
                                stdout=stdout, stderr=stderr)
    return _Watched(launcher, report)


def _read_report(w: _Watched) -> list[str]:
    try:
        with open(w.report) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _sample(watched: list[_Watched], stop: threading.Event) -> None:
    while not stop.is_set():
        for w in watched:
            if w.done.is_set():
                continue
            if not w.pid:
                lines = _read_report(w)
                if not lines:
                    continue
                w.pid = int(lines[0])
            st = _read_status(w.pid)
            w.stats.rss_anon_peak_kib = max(w.stats.rss_anon_peak_kib, st.get("RssAnon", 0))
            w.stats.rss_file_peak_kib = max(w.stats.rss_file_peak_kib, st.get("RssFile", 0))
        stop.wait(SAMPLE_S)


def _reap(w: _Watched) -> None:
    w.launcher.wait()
    lines = _read_report(w)
    if len(lines) >= 2:
        code, utime, stime, maxrss = lines[1].split()
        w.stats.returncode = int(code)
        w.stats.cpu_user_s, w.stats.cpu_sys_s = float(utime), float(stime)
        w.stats.maxrss_kib = int(maxrss)
    else:
        w.stats.returncode = w.launcher.returncode or -1
    w.done.set()


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def cli(*args: str, netns: str | None = None) -> list[str]:
    return [*netns_prefix(netns), sys.executable, "-m", "multifd_core.cli", *args]


def run_procs(image: str, method: str, channels: int, *, level: int | None = None,
              engine: str | None = None, host: str = LOOPBACK, send_ns: str | None = None,
              recv_ns: str | None = None, timeout: float = 300.0,
              workdir: str | None = None) -> dict[str, Any]:
    """Migrate ``image`` (one block ``pc.ram``) from a ``multifd send`` process to a
    ``multifd recv`` process; return the sender's JSON summary plus both sides' costs.

    ``engine`` is the sender's; the receiver picks its own first available engine.
    """
    port = free_port()
    addr = f"tcp:{host}:{port}"
    out_dir = tempfile.mkdtemp(prefix="bench-recv-", dir=workdir)
    logs = tempfile.mkdtemp(prefix="bench-logs-", dir=workdir)
    recv_args = ["recv", "--listen", addr, "--out", out_dir, "--compression", method,
                 "--json", "--timeout", str(timeout)]
    if host not in (LOOPBACK, "localhost", "::1"):
        recv_args.append("--allow-remote")
    send_args = ["send", f"pc.ram={image}", addr, "--compression", method,
                 "--channels", str(channels), "--json", "--timeout", str(timeout)]
    if level is not None:
        send_args += ["--level", str(level)]
    if engine is not None:
        send_args += ["--engine", engine]
    files = {k: open(os.path.join(logs, k), "w+b") for k in ("ro", "re", "so", "se")}
    watched: list[_Watched] = []
    stop = threading.Event()
    try:
        watched.append(_launch(cli(*recv_args, netns=recv_ns), os.path.join(logs, "recv"),
                               files["ro"], files["re"]))
        started = time.perf_counter()
        watched.append(_launch(cli(*send_args, netns=send_ns), os.path.join(logs, "send"),
                               files["so"], files["se"]))
        threads = [threading.Thread(target=_reap, args=(w,), daemon=True) for w in watched]
        sampler = threading.Thread(target=_sample, args=(watched, stop), daemon=True)
        for t in [*threads, sampler]:
            t.start()
        deadline = time.monotonic() + timeout + 30
        for w in watched:
            if not w.done.wait(max(0.0, deadline - time.monotonic())):
                break
        wall = time.perf_counter() - started
    finally:
        stop.set()
        for w in watched:
            if not w.done.is_set():
                _kill(w)
                w.done.wait(10)
        texts = {}
        for k, f in files.items():
            f.seek(0)
            texts[k] = f.read().decode(errors="replace")
            f.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    recv_w, send_w = watched
    for side, w, err in (("receiver", recv_w, texts["re"]), ("sender", send_w, texts["se"])):
        if w.returncode != 0:
            raise MultiFDError(f"{method} x{channels}: {side} failed "
                               f"(exit {w.returncode}): {err.strip()[-400:]}")
    try:
        row = json.loads(texts["so"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MultiFDError(f"sender printed no JSON summary: {texts['so'][-200:]!r}") from None
    row.update(level=level, engine=engine or "default", wall_s=round(wall, 4),
               sender=send_w.stats.as_dict(), receiver=recv_w.stats.as_dict())
    return row


def _kill(w: _Watched) -> None:
    """Kill the side (by the pid its launcher reported), then the launcher."""
    lines = _read_report(w)
    if lines:
        try:
            os.kill(int(lines[0]), 9)
        except (OSError, ValueError):
            pass
    w.launcher.kill()


def startup_cost() -> ProcStats:
    """CPU and memory of a ``multifd methods --json`` process (interpreter, imports,
    plugin loading): the fixed part of every side's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        w = _launch(cli("methods", "--json"), os.path.join(tmp, "report"),
                    subprocess.DEVNULL, subprocess.DEVNULL)
        _reap(w)
    return w.stats
