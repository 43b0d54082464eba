"""What a user waits for: ``multifd send`` -> ``multifd recv`` wall time, verified and durable,
beside the limits measured in the same run, with each side's phases and CPU.

* durable-write limit: the image's non-zero pages pwritten into a fresh file, then fdatasync;
* bare sockets: the non-zero bytes over 4 loopback connections to a sink process;
* native wall: from starting ``multifd send`` until both processes have exited (``recv`` is
  started first and is listening: the user's order); ``recv start`` is its own start-up;
* phases of each side (``--json``: waiting, connecting, negotiating, transferring, syncing,
  verifying), the engine's CPU (its channel threads, user + system) and each process's CPU
  (``wait4``), per GiB of RAM moved;
* projection: a side's GiB/s on 16 and 64 cores, the smaller of cores / (CPU per GiB) and
  1 / (user CPU per GiB): user time is taken as holding the GIL (pessimistic: codecs and
  hashing release it), system time as parallel.

Cases run interleaved, ``--repeat`` times; medians. Each timed step starts right after
``--warm-gib`` GiB of memory was touched and freed (``benchmarks.warm``: on a VM that hands
free memory back to its host, the figures otherwise follow the host). Run:
``python -m benchmarks.bench_wall [--size-mib 1024] [--repeat 3] [--warm-gib 2] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_engine import bare_sockets
from benchmarks.common import free_port
from benchmarks.warm import WARM_GIB, warm_line, warm_memory, warm_range
from multifd_core.demo import mixed_image_path
from multifd_core.engine.ram import RamBlock
from multifd_core.wire.pages import run_bounds, zero_mask

CLI = [sys.executable, "-m", "multifd_core.cli"]
CASES = (("none", 4), ("zstd", 2))
GIB = 1 << 30


def durable_limit(image: str, workdir: str, *, warm_gib: float = 0.0) -> tuple[float, float | None]:
    """Seconds to pwrite the image's non-zero pages into a new file and fdatasync it, and the
    cost per page of the ``warm_gib`` warm-up right before (None: none)."""
    block = RamBlock.from_file(image, "pc.ram")
    try:
        data = block.words
        nonzero = np.flatnonzero(~zero_mask(data))
        starts, ends = run_bounds(nonzero)
        raw = memoryview(block.array)
        page = block.page_size
        path = os.path.join(workdir, "durable.img")
        warm = warm_memory(warm_gib)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, block.used_length)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                off = int(nonzero[s]) * page
                os.pwrite(fd, raw[off:off + (e - s) * page], off)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        took = time.perf_counter() - t0
        os.unlink(path)
        return took, warm
    finally:
        block.close()


def _waited(proc: subprocess.Popen[bytes], out: dict[str, Any], key: str) -> threading.Thread:
    """Reap ``proc`` with wait4 in a thread: its exit time and CPU (user, system) go to out."""

    def reap() -> None:
        _, status, ru = os.wait4(proc.pid, 0)
        out[key] = {"exit": time.perf_counter(), "status": os.waitstatus_to_exitcode(status),
                    "user": ru.ru_utime, "system": ru.ru_stime}
        proc.returncode = out[key]["status"]

    t = threading.Thread(target=reap, daemon=True)
    t.start()
    return t


def native(image: str, method: str, channels: int, workdir: str,
           timeout: float = 120.0, *, warm_gib: float = 0.0) -> dict[str, Any]:
    """One ``send`` -> ``recv`` run as separate processes; times from send's start (``recv``
    listening first, then the ``warm_gib`` warm-up)."""
    out_dir = os.path.join(workdir, f"out-{method}-{channels}")
    shutil.rmtree(out_dir, ignore_errors=True)
    addr = f"tcp:127.0.0.1:{free_port()}"
    reaped: dict[str, Any] = {}
    t_recv = time.perf_counter()
    recv = subprocess.Popen([*CLI, "recv", "-v", "--listen", addr, "--out", out_dir,
                             "--compression", method, "--json", "--timeout", str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert recv.stderr is not None and recv.stdout is not None
    for line in recv.stderr:
        if b"listening on" in line:
            break
    else:
        raise RuntimeError("recv exited before listening")
    ready = time.perf_counter() - t_recv
    drain = threading.Thread(target=recv.stderr.read, daemon=True)
    drain.start()
    reap_recv = _waited(recv, reaped, "recv")
    warm = warm_memory(warm_gib)
    t0 = time.perf_counter()
    send = subprocess.Popen([*CLI, "send", f"pc.ram={image}", addr, "--compression", method,
                             "--channels", str(channels), "--json", "--timeout", str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reap_send = _waited(send, reaped, "send")
    send_out, send_err = send.stdout.read(), send.stderr.read()  # type: ignore[union-attr]
    recv_out = recv.stdout.read()
    reap_send.join(timeout)
    reap_recv.join(timeout)
    if reaped["send"]["status"] or reaped["recv"]["status"]:
        raise RuntimeError(f"{method} x{channels} failed: {send_err.decode()[-300:]}")
    shutil.rmtree(out_dir, ignore_errors=True)
    sides = {"send": json.loads(send_out), "recv": json.loads(recv_out)}
    row: dict[str, Any] = {"method": method, "channels": channels, "recv_start_s": ready,
                           "wall_s": max(reaped[k]["exit"] for k in reaped) - t0,
                           "transfer_s": sides["send"]["transfer_seconds"], "warm_us": warm}
    ram = sides["send"]["ram_bytes"] / GIB
    for side, st in sides.items():
        cpu = st.get("channel_cpu") or {"user": float("nan"), "system": float("nan")}
        row[side] = {"seconds": st["seconds"], "phases": st["phases"],
                     "engine_cpu_per_gib": (cpu["user"] / ram, cpu["system"] / ram),
                     "process_cpu_per_gib": (reaped[side]["user"] / ram,
                                             reaped[side]["system"] / ram),
                     "exit_after_s": reaped[side]["exit"] - t0}
    return row


def projection(user: float, system: float, cores: int) -> float:
    """GiB/s one process could move on ``cores`` cores at this CPU per GiB (see the doc)."""
    total = user + system
    return min(cores / total if total else float("inf"), 1 / user if user else float("inf"))


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (its other figures kept together)."""
    return sorted(rows, key=lambda r: r["wall_s"])[len(rows) // 2]


def run(size_mib: int, repeat: int, workdir: str, warm_gib: float = WARM_GIB) -> dict[str, Any]:
    image = mixed_image_path(size_mib)
    block = RamBlock.from_file(image, "pc.ram")
    pages = block.words
    nonzero = memoryview(pages[~zero_mask(pages)].tobytes())  # what the channels carry
    block.close()
    res: dict[str, Any] = {"size_mib": size_mib, "repeat": repeat, "warm_gib": warm_gib}
    durable, sockets, warms = [], [], []
    runs: dict[str, list[dict[str, Any]]] = {f"{m} x{c}": [] for m, c in CASES}
    for _ in range(repeat):
        took, warm = durable_limit(image, workdir, warm_gib=warm_gib)
        durable.append(took)
        warms.append(warm)
        warm = warm_memory(warm_gib)
        sockets.append(bare_sockets(nonzero, 4, "mem"))
        warms.append(warm)
        for method, ch in CASES:
            runs[f"{method} x{ch}"].append(native(image, method, ch, workdir,
                                                  warm_gib=warm_gib))
            warms.append(runs[f"{method} x{ch}"][-1]["warm_us"])
    res["durable_limit_s"] = statistics.median(durable)
    res["bare_sockets_s"] = statistics.median(sockets)
    res["warm_us_per_page"] = warm_range(warms)
    res["cases"] = {k: {**median_row(v), "walls": sorted(r["wall_s"] for r in v)}
                    for k, v in runs.items()}
    return res


def print_report(res: dict[str, Any]) -> None:
    lim = max(res["durable_limit_s"], 1e-9)
    print(f"\n{res['size_mib']} MiB mixed image, median of {res['repeat']} interleaved runs; "
          f"durable-write limit {res['durable_limit_s']:.2f} s, bare sockets x4 "
          f"{res['bare_sockets_s']:.2f} s")
    print(warm_line(res.get("warm_gib", 0), res.get("warm_us_per_page")))
    head = (f"{'case':<9} {'wall':>6} {'/limit':>7} {'transfer':>9} {'recv start':>11}  "
            "phases of the receiver (s)")
    print(head)
    print("-" * 100)
    for name, r in res["cases"].items():
        ph = ", ".join(f"{k} {v:.2f}" for k, v in r["recv"]["phases"].items())
        print(f"{name:<9} {r['wall_s']:>6.2f} {r['wall_s'] / lim:>6.2f}x {r['transfer_s']:>9.2f} "
              f"{r['recv_start_s']:>11.2f}  {ph}")
        print(f"{'':<9} walls {', '.join(f'{w:.2f}' for w in r['walls'])}; sender phases: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["send"]["phases"].items()))
    print("\nCPU-seconds per GiB of RAM (user + system); projected GiB/s of one process at "
          "16 / 64 cores")
    for name, r in res["cases"].items():
        for side in ("send", "recv"):
            eu, es = r[side]["engine_cpu_per_gib"]
            pu, ps = r[side]["process_cpu_per_gib"]
            print(f"{name:<9} {side:<5} engine {eu:.3f} + {es:.3f}   process {pu:.3f} + "
                  f"{ps:.3f}   -> {projection(eu, es, 16):.1f} / {projection(eu, es, 64):.1f} "
                  "GiB/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warm-gib", type=float, default=WARM_GIB,
                   help="GiB of memory touched and freed before each timed step (0: none; "
                        "see benchmarks/warm.py)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-wall-", dir=a.workdir)
    try:
        res = run(a.size_mib, a.repeat, work, a.warm_gib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
