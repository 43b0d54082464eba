"""Soak: many consecutive native sessions through one long-running receiver (a script).

One process keeps one listener and serves session after session on it (a ``ReceiveSession``
per migration, as a long-running receiver would), while a sender in the same process
migrates a mixed image each time. Open file descriptors, threads and RSS are sampled after
the first migration (warm-up: imports, caches, allocator pools) and after the last; growth
beyond noise means a leak.

In-memory destination blocks (``RamBlock.zeros``) are anonymous mappings of their own, so
each session's blocks go back to the system when it ends (as heap buffers they could stay
with the process under glibc's sliding mmap threshold, and RSS would climb in block-sized
steps with nothing alive).

Usage::

    python -m benchmarks.soak [--runs 50] [--size-mib 256] [--method none] [--channels 4]
                              [--output memory|files] [--json PATH]

``soak(...)`` returns the report; tests/test_soak.py runs a short version.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np

from multifd_core.engine.ram import RamBlock
from multifd_core.image import fill_mixed
from multifd_core.session import FileOutput, ReceiveSession, send_session
from multifd_core.session.transport import Address, bound_address, listen

PS = 4096




def sample() -> dict[str, int]:
    """Open fds, threads (kernel view) and RSS of this process."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": int(status["Threads"][0]),
            "python_threads": threading.active_count(),
            "rss_kib": int(status["VmRSS"][0])}


def soak(*, runs: int = 50, size_mib: int = 256, method: str = "none", channels: int = 4,
         output: str = "memory", timeout: float = 60.0, quiet: bool = True) -> dict[str, Any]:
    buf = np.zeros(size_mib << 20, dtype=np.uint8)
    fill_mixed(buf.reshape(-1, PS), seed=7)
    src = RamBlock("pc.ram", buf)
    want = src.digest()
    listener = listen(Address("tcp", host="127.0.0.1", port=0))
    addr = bound_address(listener, Address("tcp", host="127.0.0.1"))
    workdir = tempfile.mkdtemp(prefix="multifd-soak-") if output == "files" else None
    samples: list[dict[str, int]] = []
    seconds: list[float] = []
    try:
        for i in range(runs):
            out = FileOutput(os.path.join(workdir, f"run{i}")) if workdir else None

            def allocate(name: str, length: int, ps: int, out: FileOutput | None = out
                         ) -> RamBlock:
                if out is not None:
                    return out.allocate(name, length, ps)
                return RamBlock.zeros(name, length, page_size=ps)

            session = ReceiveSession(listener, allocate, timeout=timeout)
            result: dict[str, Any] = {}
            server = threading.Thread(target=lambda s=session, r=result: r.update(
                stats=s.serve()), name="soak-receiver")
            server.start()
            t0 = time.perf_counter()
            stats = send_session([src], addr, method=method, channels=channels,
                                 timeout=timeout)
            server.join(timeout)
            seconds.append(time.perf_counter() - t0)
            if "stats" not in result or result["stats"].digests["pc.ram"] != want:
                raise SystemExit(f"run {i}: the receiver did not verify")
            assert stats.digests["pc.ram"] == want
            del session, result, stats
            if out is not None:
                out.close()
                shutil.rmtree(out.out_dir)
            gc.collect()
            if i == 0 or i == runs - 1:
                samples.append(sample())
            if not quiet:
                s = sample()
                print(f"run {i + 1:3d}: {seconds[-1]:6.3f} s  fds {s['fds']}  threads "
                      f"{s['threads']}  rss {s['rss_kib'] / 1024:.0f} MiB", flush=True)
    finally:
        listener.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    start, end = samples[0], samples[-1]
    return {
        "runs": runs, "size_mib": size_mib, "method": method, "channels": channels,
        "output": output, "start": start, "end": end,
        "growth": {k: end[k] - start[k] for k in start},
        "seconds": {"min": round(min(seconds), 3), "median": round(float(np.median(seconds)), 3),
                    "max": round(max(seconds), 3)},
        "throughput_gb_s_median": round((size_mib << 20) / float(np.median(seconds)) / 1e9, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--method", default="none")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--output", choices=["memory", "files"], default="memory")
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args()
    report = soak(runs=a.runs, size_mib=a.size_mib, method=a.method, channels=a.channels,
                  output=a.output, quiet=False)
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
