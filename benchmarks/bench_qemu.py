"""QEMU->QEMU vs QEMU->our capture, and our replay->QEMU, on one guest, in one run.

The guest: ``-m 1G`` (pc, paused, ordinary anonymous RAM: ``memory-backend-ram``; a sparse
``memory-backend-file`` made QEMU's source zero a page-cache page for every never-written page
it read, 60-70% of its CPU in slow trials) with a 512 MiB mixed region
(the project's deterministic image: 40% zero, 30% text-like, 30% random pages) placed at 1 MiB
by QEMU's loader device. For each method and channel count:

* QEMU->QEMU: the source's ``total-time`` (ms) into a QEMU destination;
* QEMU->capture: the source's ``total-time`` into ``multifd qemu capture`` (its own process,
  as a user runs it), and the capture's wall: from ``migrate`` until the process exits,
  verified and durable;
* replay->QEMU: ``multifd qemu replay``'s wall from its start until the destination reports
  ``completed`` (digests checked while sending);
* native: the captured ``pc.ram`` sent with ``multifd send`` to ``multifd recv`` (separate
  processes), wall from send's start until both exited, verified and durable;
* the durable-write limit: the captured ``pc.ram``'s non-zero pages pwritten into a new file
  and fdatasync'ed.

Each cell runs ``--repeat`` interleaved trials (QEMU->QEMU, capture, replay, native, durable
limit, in that order each time); the table gives medians, and each ratio is the median of the
trials' ratios: capture and native walls against the larger of QEMU->QEMU and the durable
limit, replay against QEMU->QEMU (target <= 1.3 each). When a cell's QEMU->QEMU trials lie
``NOISY`` (1.5x) or more apart, the table says so under the cell: its ratios then follow the
machine's load more than the code (the JSON keeps ``qemu_range_ms`` for every cell).

Every timed step starts right after ``--warm-gib`` GiB of memory was touched and freed
(``benchmarks.warm``): on a VM that hands its free memory back to the host, the first touch of
a page otherwise costs a host fault, and QEMU->QEMU alone varies 2-6x with the idle time
before it. The JSON keeps each step's ``warm_us`` (what the warm-up cost per page).

Mapped-ram files (``--mapped-ram``, and ``multifd bench --qemu``), N channels / threads:

* QEMU save: the source's ``total-time`` of ``migrate file:`` with mapped-ram (+ multifd);
* import: ``multifd qemu import`` of that file, wall time to a durable, verified capture;
* QEMU restore: wall time from ``migrate-incoming file:`` until ``completed``;
* export: ``multifd qemu export`` of the import, wall time to a durable, verified file (which
  QEMU then restores, timed too).

Run: ``.venv/bin/python -m benchmarks.bench_qemu [--mem-mib 1024 --mixed-mib 512]
[--mapped-ram]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_wall import durable_limit
from benchmarks.bench_wall import native as native_run
from benchmarks.warm import WARM_GIB, warm_line, warm_memory, warm_range
from multifd_core.engine.ram import RamBlock
from multifd_core.image import write_mixed_image
from multifd_core.methods.registry import default_registry
from multifd_core.qemu.snapshot import export_capture, import_file
from multifd_core.qemu.vm import GuestConfig, QemuVM, qemu_missing_reason

CLI = [sys.executable, "-m", "multifd_core.cli"]


def _listening_port(proc: subprocess.Popen[str]) -> int:
    """The port ``multifd qemu capture`` says it listens on (its first stderr line)."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if "listening on" not in line:
        raise RuntimeError(f"capture did not start: {line.strip()} {proc.stderr.read()[-300:]}")
    return int(line.rsplit(":", 1)[1])


class Bench:
    def __init__(self, workdir: Path, mem_mib: int, blob: Path, *,
                 warm_gib: float = WARM_GIB) -> None:
        self.workdir = workdir
        self.mem_mib = mem_mib
        self.blob = blob
        self.warm_gib = warm_gib

    def warm(self) -> float | None:
        """Right before a timed step: ``warm_memory`` (see benchmarks.warm)."""
        return warm_memory(self.warm_gib)

    def vm(self, name: str, *, incoming: bool = False) -> QemuVM:
        cfg = GuestConfig(machine="pc", mem_mib=self.mem_mib, anonymous=True, incoming=incoming,
                          loaders=[] if incoming else [(self.blob, 0x100000)])
        return QemuVM(self.workdir, name, cfg).start()

    def _incoming(self, dst: QemuVM, channels: int, method: str) -> str:
        dst.set_migration(channels=channels, compression=method)
        dst.migrate_incoming("tcp:127.0.0.1:0")
        assert dst.qmp is not None
        port = dst.qmp.execute("query-migrate")["socket-address"][0]["port"]
        return f"tcp:127.0.0.1:{port}"

    def qemu_to_qemu(self, method: str, channels: int) -> dict[str, Any]:
        src, dst = self.vm("src"), self.vm("dst", incoming=True)
        try:
            uri = self._incoming(dst, channels, method)
            src.set_migration(channels=channels, compression=method)
            warm = self.warm()
            src.migrate(uri)
            info = src.qmp.wait_migration(timeout=300)
            dinfo = dst.qmp.wait_migration(timeout=60)
            assert info["status"] == dinfo["status"] == "completed", (info, dinfo)
            return {"total_ms": info["total-time"], "mbps": info["ram"]["mbps"],
                    "transferred": info["ram"]["transferred"], "warm_us": warm}
        finally:
            src.stop()
            dst.stop()

    def qemu_to_capture(self, method: str, channels: int, out: Path) -> dict[str, Any]:
        """``multifd qemu capture`` as a user runs it (its own process, listening first); the
        wall is from QEMU's ``migrate`` until that process exits, verified and durable."""
        src = self.vm("src")
        shutil.rmtree(out, ignore_errors=True)
        t_start = time.perf_counter()
        cap = subprocess.Popen([*CLI, "qemu", "capture", "--listen", "tcp:127.0.0.1:0",
                                "--out", str(out), "-n", str(channels), "-c", method, "--json",
                                "--timeout", "120"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = _listening_port(cap)
            ready = time.perf_counter() - t_start
            src.set_migration(channels=channels, compression=method)
            warm = self.warm()
            t0 = time.perf_counter()
            src.migrate(f"tcp:127.0.0.1:{port}")
            stdout, stderr = cap.communicate(timeout=300)
            wall = time.perf_counter() - t0
            info = src.qmp.wait_migration(timeout=300)
            assert info["status"] == "completed" and cap.returncode == 0, (info, stderr)
            manifest = json.loads(stdout)
            return {"total_ms": info["total-time"], "mbps": info["ram"]["mbps"],
                    "capture_s": manifest["statistics"]["seconds"],
                    "wall_ms": round(wall * 1000), "start_ms": round(ready * 1000),
                    "warm_us": warm}
        finally:
            if cap.poll() is None:
                cap.kill()
                cap.wait()
            src.stop()

    def replay_to_qemu(self, capdir: Path, method: str, channels: int) -> dict[str, Any]:
        """``multifd qemu replay`` as a user runs it: wall from its start until it has exited
        and the destination reports ``completed``."""
        dst = self.vm("dst", incoming=True)
        try:
            uri = self._incoming(dst, channels, method)
            warm = self.warm()
            t0 = time.perf_counter()
            run = subprocess.run([*CLI, "qemu", "replay", str(capdir), uri, "-n", str(channels),
                                  "-c", method, "--json", "--timeout", "120"],
                                 capture_output=True, text=True, timeout=300)
            exited = time.perf_counter() - t0
            info = dst.qmp.wait_migration(timeout=60, poll=0.005)
            wall = time.perf_counter() - t0
            assert run.returncode == 0 and info["status"] == "completed", (run.stderr, info)
            stats = json.loads(run.stdout)
            return {"total_ms": round(wall * 1000), "exit_ms": round(exited * 1000),
                    "wire": stats["wire_bytes"], "seconds": stats["seconds"],
                    "phases": stats.get("phases", {}), "warm_us": warm}
        finally:
            dst.stop()

    def native(self, capdir: Path, method: str, channels: int) -> dict[str, Any]:
        """The captured guest RAM sent with ``multifd send`` -> ``multifd recv``."""
        row = native_run(str(_largest_block(capdir)), method, channels, str(self.workdir),
                         warm_gib=self.warm_gib)
        return {"total_ms": round(row["wall_s"] * 1000), "warm_us": row["warm_us"],
                "transfer_ms": round(row["transfer_s"] * 1000),
                "recv_phases": row["recv"]["phases"], "send_phases": row["send"]["phases"]}

    def durable(self, capdir: Path) -> dict[str, Any]:
        """The durable-write limit of the captured guest RAM."""
        took, warm = durable_limit(str(_largest_block(capdir)), str(self.workdir),
                                   warm_gib=self.warm_gib)
        return {"total_ms": round(1000 * took), "warm_us": warm}

    def cell(self, method: str, channels: int, repeat: int,
             guard: Any = None) -> dict[str, Any]:
        """``repeat`` interleaved trials of every way to move this guest's RAM; medians, and
        the median of each trial's ratio. ``guard`` wraps each run (the suite's: an error
        becomes a row field instead of ending the run)."""
        def call(fn: Any) -> dict[str, Any]:
            return guard(fn) if guard is not None else fn()

        capdir = self.workdir / f"cap-{method}-{channels}"
        trials: list[dict[str, Any]] = []
        try:
            for _ in range(max(1, repeat)):
                t: dict[str, Any] = {"qemu_to_qemu": call(lambda: self.qemu_to_qemu(
                    method, channels))}
                t["qemu_to_capture"] = call(lambda: self.qemu_to_capture(method, channels,
                                                                         capdir))
                if "error" not in t["qemu_to_capture"]:
                    t["replay_to_qemu"] = call(lambda: self.replay_to_qemu(capdir, method,
                                                                           channels))
                    t["native"] = call(lambda: self.native(capdir, method, channels))
                    t["durable_limit"] = call(lambda: self.durable(capdir))
                trials.append(t)
        finally:
            shutil.rmtree(capdir, ignore_errors=True)
        return summarize(method, channels, trials)

    # ------------------------------------------------------------------ mapped-ram files

    def qemu_save(self, path: Path, channels: int | None) -> dict[str, Any]:
        src = self.vm("src")
        try:
            path.unlink(missing_ok=True)
            src.set_mapped_ram(channels=channels)
            self.warm()
            src.migrate(f"file:{path}")
            info = src.qmp.wait_migration(timeout=300, poll=0.005)
            assert info["status"] == "completed", info
            return {"total_ms": info["total-time"], "file_bytes": path.stat().st_size}
        finally:
            src.stop()

    def qemu_restore(self, path: Path, channels: int | None) -> dict[str, Any]:
        dst = self.vm("dst", incoming=True)
        try:
            dst.set_mapped_ram(channels=channels)
            self.warm()
            t0 = time.perf_counter()
            dst.migrate_incoming(f"file:{path}")
            info = dst.qmp.wait_migration(timeout=300, poll=0.005)
            wall = time.perf_counter() - t0
            assert info["status"] == "completed", info
            return {"total_ms": round(wall * 1000)}
        finally:
            dst.stop()

    def mapped_ram(self, channels: int, repeat: int = 1) -> dict[str, Any]:
        """QEMU save and restore against our export and import, same guest, same run."""
        saved, ours = self.workdir / "qemu.mr", self.workdir / "ours.mr"
        capdir = self.workdir / "imported"
        row: dict[str, Any] = {"channels": channels}
        row["qemu_save"] = best(lambda: self.qemu_save(saved, channels), repeat)

        def imp() -> dict[str, Any]:
            shutil.rmtree(capdir, ignore_errors=True)
            self.warm()
            t0 = time.perf_counter()
            m = import_file(saved, capdir, threads=channels)
            return {"total_ms": round((time.perf_counter() - t0) * 1000),
                    "copy_ms": round(m["statistics"]["seconds"] * 1000)}

        def exp() -> dict[str, Any]:
            # Not over an old file: freeing its blocks (online discard here) would be timed
            # inside the rename. QEMU's save likewise starts without one.
            ours.unlink(missing_ok=True)
            self.warm()
            t0 = time.perf_counter()
            r = export_capture(capdir, ours, threads=channels)
            return {"total_ms": round((time.perf_counter() - t0) * 1000),
                    "file_bytes": r["size"]}

        row["import"] = best(imp, repeat)
        row["digest_ms"] = digest_floor(capdir)
        row["qemu_restore"] = best(lambda: self.qemu_restore(saved, channels), repeat)
        row["export"] = best(exp, repeat)
        row["qemu_restore_ours"] = best(lambda: self.qemu_restore(ours, channels), repeat)
        row["export_ratio"] = round(row["export"]["total_ms"] / row["qemu_save"]["total_ms"], 2)
        row["import_ratio"] = round(row["import"]["total_ms"]
                                    / row["qemu_restore"]["total_ms"], 2)
        shutil.rmtree(capdir, ignore_errors=True)
        for f in (saved, ours):
            f.unlink(missing_ok=True)
        return row


def _largest_block(capdir: Path) -> Path:
    """The capture's guest RAM file (``pc.ram``: its largest block)."""
    return max(capdir.glob("*.ram"), key=lambda f: f.stat().st_size)


def _ms(trial: dict[str, Any], key: str, field: str = "total_ms") -> float | None:
    value = (trial.get(key) or {}).get(field)
    return float(value) if isinstance(value, int | float) else None


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


#: QEMU->QEMU trials this far apart (slowest / fastest) mark a cell's ratios as unreliable.
NOISY = 1.5


def summarize(method: str, channels: int, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's medians and median ratios (see the module's doc), with every trial kept."""
    row: dict[str, Any] = {"method": method, "channels": channels, "trials": trials}
    columns = {"qemu_ms": ("qemu_to_qemu", "total_ms"),
               "capture_src_ms": ("qemu_to_capture", "total_ms"),
               "capture_wall_ms": ("qemu_to_capture", "wall_ms"),
               "replay_wall_ms": ("replay_to_qemu", "total_ms"),
               "native_wall_ms": ("native", "total_ms"),
               "native_transfer_ms": ("native", "transfer_ms"),
               "durable_ms": ("durable_limit", "total_ms"),
               "qemu_mbps": ("qemu_to_qemu", "mbps"), "capture_mbps": ("qemu_to_capture", "mbps")}
    for name, (key, field) in columns.items():
        row[name] = _median([_ms(t, key, field) for t in trials])
    ratios: dict[str, list[float | None]] = {"capture": [], "native": [], "replay": []}
    for t in trials:
        qq, dl = _ms(t, "qemu_to_qemu"), _ms(t, "durable_limit")
        base = max(qq or 0, dl or 0) or None
        for name, value, against in (("capture", _ms(t, "qemu_to_capture", "wall_ms"), base),
                                     ("native", _ms(t, "native"), base),
                                     ("replay", _ms(t, "replay_to_qemu"), qq)):
            ratios[name].append(value / against if value and against else None)
    row["ratios"] = {k: (round(m, 2) if (m := _median(v)) is not None else None)
                     for k, v in ratios.items()}
    qemu = [v for t in trials if (v := _ms(t, "qemu_to_qemu")) is not None]
    row["qemu_range_ms"] = [min(qemu), max(qemu)] if qemu else None
    row["warm_us_per_page"] = warm_range([v.get("warm_us") for t in trials for v in t.values()
                                          if isinstance(v, dict)])
    row["errors"] = sorted({f"{k}: {v['error']}" for t in trials for k, v in t.items()
                            if isinstance(v, dict) and "error" in v})
    return row


def print_cells(rows: list[dict[str, Any]], repeat: int, warm_gib: float = 0.0) -> None:
    """The cells' medians (ms) and median ratios (target <= 1.3)."""
    print(f"medians of {repeat} interleaved trials, ms; ratios: capture and native walls / "
          "max(QEMU->QEMU, durable limit), replay wall / QEMU->QEMU (median of the trials' "
          "ratios; target <= 1.3)")
    head = (f"{'method':<7}{'ch':>3} {'QEMU->QEMU':>11} {'durable':>8} {'->cap src':>10} "
            f"{'cap wall':>9} {'ratio':>6} {'native':>7} {'ratio':>6} {'replay':>7} "
            f"{'ratio':>6} {'QEMU Mbit/s':>12} {'->cap Mbit/s':>13}")
    print(head)
    print("-" * len(head))

    def f(v: float | None, width: int, fmt: str = ".0f") -> str:
        return f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}"

    for r in rows:
        q = r["ratios"]
        print(f"{r['method']:<7}{r['channels']:>3} {f(r['qemu_ms'], 11)} {f(r['durable_ms'], 8)} "
              f"{f(r['capture_src_ms'], 10)} {f(r['capture_wall_ms'], 9)} "
              f"{f(q['capture'], 6, '.2f')} {f(r['native_wall_ms'], 7)} "
              f"{f(q['native'], 6, '.2f')} {f(r['replay_wall_ms'], 7)} "
              f"{f(q['replay'], 6, '.2f')} {f(r['qemu_mbps'], 12)} {f(r['capture_mbps'], 13)}")
        low, high = r.get("qemu_range_ms") or (None, None)
        if low and high / low >= NOISY:
            print(f"{'':<10}QEMU->QEMU trials took {low:.0f}-{high:.0f} ms ({high / low:.1f}x "
                  "apart): the machine was loaded, so compare walls rather than ratios")
        for e in r["errors"]:
            print(f"{'':<10}error: {e}")
    print(warm_line(warm_gib, warm_range([v for r in rows
                                          for v in (r.get("warm_us_per_page") or [])])))


def digest_floor(capdir: Path) -> int:
    """ms to digest the imported blocks once from the page cache (BLAKE3, all cores): what
    any verified import pays at least (the manifest holds a digest of each whole block)."""
    t0 = time.perf_counter()
    for f in sorted(capdir.glob("*.ram")):
        block = RamBlock.from_file(f)
        block.digest()
        block.close()
    return round((time.perf_counter() - t0) * 1000)


def print_mapped_ram(rows: list[dict[str, Any]]) -> None:
    head = (f"{'ch':>3} {'QEMU save':>10} {'export':>8} {'ratio':>6} {'QEMU restore':>13} "
            f"{'import':>8} {'ratio':>6} {'digest only':>12} {'QEMU restores ours':>19}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r.get('channels', '?'):>3} {r['error']}")
            continue
        print(f"{r['channels']:>3} {r['qemu_save']['total_ms']:>10} {r['export']['total_ms']:>8} "
              f"{r['export_ratio']:>6.2f} {r['qemu_restore']['total_ms']:>13} "
              f"{r['import']['total_ms']:>8} {r['import_ratio']:>6.2f} {r['digest_ms']:>12} "
              f"{r['qemu_restore_ours']['total_ms']:>19}")


def best(run: Any, repeat: int) -> dict[str, Any]:
    """The fastest of ``repeat`` runs (by total_ms)."""
    return min((run() for _ in range(max(1, repeat))), key=lambda r: r["total_ms"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mem-mib", type=int, default=1024)
    p.add_argument("--mixed-mib", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=["none", "zstd"])
    p.add_argument("--channels", nargs="+", type=int, default=[2, 4])
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved trials per cell (medians; mapped-ram rows: the best)")
    p.add_argument("--json", metavar="PATH", help="write the cells, every trial included")
    p.add_argument("--workdir", default=None)
    p.add_argument("--warm-gib", type=float, default=WARM_GIB,
                   help="GiB of memory touched and freed before each timed step (0: none; "
                        "see benchmarks/warm.py)")
    p.add_argument("--mapped-ram", action="store_true",
                   help="only the mapped-ram rows (QEMU save/restore vs export/import)")
    args = p.parse_args(argv)
    reason = qemu_missing_reason()
    if reason:
        print(f"bench_qemu: {reason}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods if m in default_registry()]
    for m in set(args.methods) - set(methods):
        print(f"bench_qemu: skipping {m}: not installed (pip install -e plugins/{m})",
              file=sys.stderr)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-qemu-"))
    work.mkdir(parents=True, exist_ok=True)
    blob = work / "mixed.bin"
    write_mixed_image(blob, args.mixed_mib << 20)
    bench = Bench(work, args.mem_mib, blob, warm_gib=args.warm_gib)
    rows = []
    if args.mapped_ram:
        try:
            mrows = [bench.mapped_ram(ch, args.repeat) for ch in args.channels]
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        print(f"\nguest: pc, -m {args.mem_mib}M, {args.mixed_mib} MiB mixed region, paused; "
              f"mapped-ram files, N channels (QEMU) = N threads (ours); best of {args.repeat}; "
              "ms; ratio = ours / QEMU's")
        print_mapped_ram(mrows)
        return 0
    try:
        for method in methods:
            for ch in args.channels:
                rows.append(bench.cell(method, ch, args.repeat))
                print(f"  done {method} x{ch}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nguest: pc, -m {args.mem_mib}M, {args.mixed_mib} MiB mixed region, paused")
    print_cells(rows, args.repeat, args.warm_gib)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
