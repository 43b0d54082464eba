"""The performance suite behind ``multifd bench`` (issue 8), in one run:

1. physical limits (``bench_limits``): bare loopback sockets (1, 4 connections), memory copy,
   first-touch writes (anonymous, sparse-file mmap), zero-page scan on one core;
2. the matrix (``bench_pairs.run_procs``): ``multifd send`` process -> ``multifd recv``
   process for every available method and sender engine, level 1 (plus zlib 6, zstd 3),
   1/2/4 channels: times, RAM GB/s, wire bytes, ratio, CPU seconds and peak RSS of each side;
3. memory against image size: ``none`` x2 at N and 4N MiB, peak RSS of each side;
4. rate-limited links (``bench_link``): namespaces + veth + tbf at 1 and 10 Gbit/s, each
   method's time there, and ``multifd_core.session.auto.predict_best``'s pick for the link rate
   measured by bare sockets in the same namespaces;
5. QEMU rows (``--qemu``, ``bench_qemu.Bench``): QEMU->QEMU and QEMU->our capture; QEMU's
   mapped-ram save and restore against our export and import of the same guest.

    .venv/bin/multifd bench [--size-mib 1024] [--json PATH] [--charts DIR] [--qemu]
                            [--sections matrix rss links qemu] [--quick]
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_pairs import run_procs, startup_cost
from multifd_core.demo import cache_dir, mixed_image_path
from multifd_core.errors import MultiFDError
from multifd_core.methods.registry import MethodRegistry, default_registry

REPO = Path(__file__).resolve().parents[1]
#: The higher level run next to level 1.
HIGHER_LEVEL = {"zlib": 6, "zstd": 3}
LINK_RATES = ("1gbit", "10gbit")
LINK_CHANNELS = 2
#: What ``--sections`` can pick (the physical limits always run: the others refer to them).
SECTIONS = ("wall", "matrix", "rss", "links", "qemu")


def is_slow(method: str, level: int | None) -> bool:
    """Combinations that run on the smaller image (``--slow-size-mib``) to fit the budget:
    pure-Python-framed or deflate above level 1 runs at tens of MB/s per core here."""
    return method == "qatzip" or (method == "zlib" and (level or 1) > 1)


@dataclass(frozen=True)
class Case:
    method: str
    level: int | None
    engine: str | None
    channels: int
    image_mib: int

    @property
    def label(self) -> str:
        lv = "" if self.level is None else f":{self.level}"
        return f"{self.method}{lv}" + (f"/{self.engine}" if self.engine else "")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _use_local_qatzip() -> None:
    """Point the qatzip plugin at this checkout's unpacked libqatzip when none is configured."""
    if not os.environ.get("MULTIFD_QATZIP_LIBRARY"):
        local = sorted(glob.glob(str(REPO / ".cache/qatzip/usr/lib/*/libqatzip.so.3")))
        if local:
            os.environ["MULTIFD_QATZIP_LIBRARY"] = local[0]


def method_variants(registry: MethodRegistry, names: list[str] | None,
                    quick: bool) -> list[tuple[str, int | None, str | None]]:
    """(method, level, engine) for every available method, engine and level to run."""
    out: list[tuple[str, int | None, str | None]] = []
    for entry in registry.entries():
        if names is not None and entry.name not in names:
            continue
        if not entry.cls.available()[0]:
            continue
        engines = [e.name for e in entry.cls.engines() if e.available]
        lv = entry.cls.levels
        levels: list[int | None] = [None]
        if lv is not None:
            levels = [1 if lv.minimum <= 1 <= lv.maximum else lv.default]
            higher = HIGHER_LEVEL.get(entry.name)
            if higher is not None and lv.minimum <= higher <= lv.maximum and not quick:
                levels.append(higher)
        for level in levels:
            for engine in engines if not quick else engines[:1]:
                out.append((entry.name, level, engine))
    if quick and names is None:
        first_other = next((v for v in out if v[0] != "none"), None)
        out = [v for v in out if v[0] == "none"] + ([first_other] if first_other else [])
    return out


def link_variants(variants: list[tuple[str, int | None, str | None]]
                  ) -> list[tuple[str, int | None, str | None]]:
    """On the links: each method's first engine, its first level, and zstd's higher level."""
    seen: set[str] = set()
    out = []
    for method, level, engine in variants:
        if method in seen and not (method == "zstd" and level == HIGHER_LEVEL["zstd"]):
            continue
        if method == "zlib" and (level or 1) > 1:
            continue
        if (method, level) in {(m, lv) for m, lv, _ in out}:
            continue
        seen.add(method)
        out.append((method, level, engine))
    return out


def _migrate(case: Case, images: dict[int, str], opts: Any, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"label": case.label, "method": case.method, "level": case.level,
                           "engine": case.engine, "channels": case.channels,
                           "image_mib": case.image_mib}
    try:
        got = run_procs(images[case.image_mib], case.method, case.channels, level=case.level,
                        engine=case.engine, timeout=opts.timeout, workdir=opts.scratch, **kw)
    except MultiFDError as exc:
        row["error"] = str(exc)
        return row
    secs = got["transfer_seconds"]
    row.update(
        transfer_s=secs, wall_s=got["wall_s"], session_s=got["seconds"],
        ram_bytes=got["ram_bytes"], ram_gb_s=round(got["ram_bytes"] / secs / 1e9, 4),
        wire_bytes=got["wire_bytes"], payload_bytes=got["payload_bytes"],
        ratio=got["compression_ratio"], normal_pages=got["normal_pages"],
        zero_pages=got["zero_pages"], sender=got["sender"], receiver=got["receiver"])
    return row


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['label']:<22}{row['channels']:>3} {row['image_mib']:>6}  FAILED: " \
               f"{row['error'][:150]}"
    s, r = row["sender"], row["receiver"]
    return (f"{row['label']:<22}{row['channels']:>3} {row['image_mib']:>6} "
            f"{row['transfer_s']:>8.3f} {row['wall_s']:>7.2f} {row['ram_gb_s']:>6.2f} "
            f"{row['wire_bytes'] / 2**20:>9.1f} {row['ratio']:>6.2f} "
            f"{s['cpu_s']:>6.2f} {r['cpu_s']:>6.2f} "
            f"{s['maxrss_kib'] / 1024:>7.0f} {r['maxrss_kib'] / 1024:>7.0f} "
            f"{s['rss_anon_peak_kib'] / 1024:>6.0f} {r['rss_anon_peak_kib'] / 1024:>6.0f}")


ROW_HEAD = (f"{'method[:level][/engine]':<22}{'ch':>3} {'MiB':>6} {'xfer s':>8} {'wall s':>7} "
            f"{'GB/s':>6} {'wire MiB':>9} {'ratio':>6} {'cpuS':>6} {'cpuR':>6} "
            f"{'rssS':>7} {'rssR':>7} {'anonS':>6} {'anonR':>6}")


# ----------------------------------------------------------------------------- sections


def section_limits(opts: Any, image: str) -> dict[str, Any]:
    from benchmarks.bench_limits import measure_limits

    _log("limits: bare sockets, memory copy, first touch, zero scan ...")
    return measure_limits(image, repeat=1 if opts.quick else 3,
                          buffer_bytes=(16 if opts.quick else 256) << 20,
                          workdir=opts.scratch)


def section_wall(opts: Any) -> dict[str, Any]:
    """``bench_wall``: send -> recv walls (verified, durable) against the durable-write limit,
    phases and CPU per side (``--quick``: once, on the small image)."""
    from benchmarks.bench_wall import run as wall_run
    from benchmarks.warm import WARM_GIB

    _log("wall: multifd send -> multifd recv, none x4 and zstd x2, against the durable write")
    return _guard(lambda: wall_run(opts.size_mib, 1 if opts.quick else 3, opts.scratch,
                                   0.0 if opts.quick else WARM_GIB))


def section_matrix(opts: Any, variants: list[tuple[str, int | None, str | None]],
                   images: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    _log(ROW_HEAD)
    for method, level, engine in variants:
        for ch in opts.channel_list:
            mib = opts.slow_mib if is_slow(method, level) else opts.size_mib
            row = _migrate(Case(method, level, engine, ch, mib), images, opts)
            _log(_row_line(row))
            rows.append(row)
    return rows


def section_rss(opts: Any, images: dict[int, str]) -> dict[str, Any]:
    """``none`` x2 at N and 4N MiB: does peak memory depend on the image size?"""
    small, big = opts.size_mib, opts.size_mib * 4
    runs = {}
    for mib in (small, big):
        row = _migrate(Case("none", None, None, 2, mib), images, opts)
        _log("rss " + _row_line(row))
        runs[mib] = row
    out: dict[str, Any] = {"sizes_mib": [small, big], "runs": list(runs.values())}
    if all("error" not in r for r in runs.values()):
        for side in ("sender", "receiver"):
            for key in ("maxrss_kib", "rss_anon_peak_kib"):
                a, b = runs[small][side][key], runs[big][side][key]
                out[f"{side}_{key}_ratio"] = round(b / a, 3) if a else None
        out["target"] = "anonymous RSS at 4N within 10% of N (ratio <= 1.10)"
        out["anon_within_10pct"] = all(
            (out[f"{s}_rss_anon_peak_kib_ratio"] or 99) <= 1.10 for s in ("sender", "receiver"))
    return out


def section_links(opts: Any, variants: list[tuple[str, int | None, str | None]],
                  images: dict[int, str], limits: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.bench_link import Link, link_missing_reason
    from multifd_core.engine.ram import RamBlock
    from multifd_core.session.auto import Candidate, predict_best

    reason = link_missing_reason()
    if reason:
        return {"skipped": reason}
    chosen = link_variants(variants)
    mib = opts.link_mib
    out: dict[str, Any] = {"image_mib": mib, "channels": LINK_CHANNELS, "links": []}
    loop = limits.get("socket_loopback", {}).get(1, {}).get("bytes_per_s")
    for rate in opts.link_rates:
        _log(f"link {rate}: namespaces + veth + tbf ...")
        entry: dict[str, Any] = {"rate": rate}
        with Link(rate) as link:
            entry["probe"] = link.probe_rate(LINK_CHANNELS, 1.0 if opts.quick else 2.0)
            _log(f"  bare sockets: {entry['probe']['bytes_per_s'] / 1e6:.0f} MB/s")
            rows = []
            for method, level, engine in chosen:
                row = _migrate(Case(method, level, engine, LINK_CHANNELS, mib), images, opts,
                               host=link.host, send_ns=link.send_ns, recv_ns=link.recv_ns)
                _log("  " + _row_line(row))
                rows.append(row)
            entry["runs"] = rows
        # both endpoints share this machine's CPUs (other jobs' load already slows the
        # sampled codec speeds, so it is not counted again)
        cores = max(1.0, (os.cpu_count() or 2) / 2)
        block = RamBlock.from_file(images[mib], "pc.ram")
        try:
            cands = [Candidate(m, lv) for m, lv, _ in chosen]
            with _quiet_stderr():  # libqatzip prints a line per session without a device
                _, report = predict_best([block], default_registry(), LINK_CHANNELS,
                                          entry["probe"]["bytes_per_s"], candidates=cands,
                                          cores=cores, socket_bytes_per_s=loop)
        finally:
            block.close()
        ok = [r for r in rows if "error" not in r]
        if ok:
            fastest = min(ok, key=lambda r: r["transfer_s"])
            picked = next((r for r in ok if _cand_label(r) == report["choice"]), None)
            report["fastest_measured"] = _cand_label(fastest)
            report["fastest_measured_s"] = fastest["transfer_s"]
            if picked is not None:
                report["choice_measured_s"] = picked["transfer_s"]
                report["regret"] = round(picked["transfer_s"] / fastest["transfer_s"] - 1, 4)
                report["picked_fastest"] = report["choice"] == report["fastest_measured"]
        report["cores_per_side"] = round(cores, 3)
        entry["auto"] = report
        _log(f"  auto picks {report['choice']} (predicted {report['candidates'][0]['predicted_s']}"
             f" s); fastest measured: {report.get('fastest_measured')}")
        out["links"].append(entry)
    out["note"] = ("auto: each side gets cpu_count / 2 cores (both endpoints share this "
                   "machine); socket cost per wire byte from the loopback 1-connection rate")
    return out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null (native libraries write there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cand_label(row: dict[str, Any]) -> str:
    return row["method"] + ("" if row["level"] is None else f":{row['level']}")


def section_qemu(opts: Any) -> dict[str, Any]:
    """QEMU->QEMU, QEMU->our capture, our replay->QEMU, our native send->recv of the captured
    RAM and the durable-write limit, as ``bench_qemu.Bench.cell`` runs them (interleaved
    trials, medians, median ratios); then the mapped-ram rows."""
    try:
        from benchmarks.bench_qemu import Bench
        from benchmarks.warm import WARM_GIB
        from multifd_core.image import write_mixed_image
        from multifd_core.qemu.vm import qemu_missing_reason
    except ImportError as exc:
        return {"skipped": f"QEMU bench not available: {exc}"}
    reason = qemu_missing_reason()
    if reason:
        return {"skipped": reason}
    mem_mib = 1024
    mixed_mib = 16 if opts.quick else 512
    repeat = 1 if opts.quick else opts.qemu_repeat
    work = Path(tempfile.mkdtemp(prefix="bench-qemu-", dir=opts.scratch))
    rows = []
    try:
        blob = work / "mixed.bin"
        write_mixed_image(blob, mixed_mib << 20)
        bench = Bench(work, mem_mib, blob, warm_gib=0.0 if opts.quick else WARM_GIB)
        registry = default_registry()
        for method in ("none", "zlib", "zstd"):
            if method not in registry:
                rows.append({"method": method, "error": f"not installed: pip install -e "
                                                        f"plugins/{method}"})
                continue
            for ch in (2,) if opts.quick else (2, 4):
                rows.append(bench.cell(method, ch, repeat, guard=_guard))
                _log(f"qemu {method} x{ch}: medians {_cell_line(rows[-1])}")
        mapped = []
        for ch in (4,) if opts.quick else (1, 4):
            mapped.append(_guard(lambda c=ch: bench.mapped_ram(c)))
            _log(f"qemu mapped-ram x{ch}: {mapped[-1]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"guest": f"pc, -m {mem_mib}M, {mixed_mib} MiB mixed region, paused",
            "repeat": repeat, "warm_gib": bench.warm_gib, "rows": rows, "mapped_ram": mapped}


def _cell_line(row: dict[str, Any]) -> str:
    keys = ("qemu_ms", "durable_ms", "capture_wall_ms", "native_wall_ms", "replay_wall_ms")
    return ", ".join(f"{k} {row.get(k)}" for k in keys) + f"; ratios {row.get('ratios')}"


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - one failing QEMU run must not end the suite
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


# ----------------------------------------------------------------------------- report


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:6.2f}"


def print_report(res: dict[str, Any]) -> None:
    h = res["host"]
    print(f"multifd bench: {res['image']['size_mib']} MiB mixed image "
          f"(40% zero / 30% text / 30% random), {h['cpus']} CPUs, load average "
          f"{h['loadavg_start'][0]:.2f} at start / {h['loadavg_end'][0]:.2f} at end "
          f"(other jobs share this machine: compare CPU seconds, not only wall times)")
    print(f"command: {' '.join(res['command'])}")
    lim = res.get("limits") or {}
    if lim:
        sl = lim["socket_loopback"]
        print("\nphysical limits (GB/s; sockets carry the non-zero bytes, 'RAM' divides the "
              "image size by the same time)")
        for c in sorted(sl, key=int):
            print(f"  bare sockets, {c} conn(s)       {_gb(sl[c]['bytes_per_s'])}  "
                  f"(RAM {_gb(sl[c]['ram_bytes_per_s']).strip()})")
        print(f"  memory copy (numpy)           {_gb(lim['memcopy_bytes_per_s'])}")
        print(f"  first touch, anonymous        {_gb(lim['first_touch_anon_bytes_per_s'])}")
        print(f"  first touch, sparse file mmap {_gb(lim['first_touch_file_bytes_per_s'])}")
        print(f"  zero-page scan, one core      {_gb(lim['zero_scan_bytes_per_s'])}  "
              f"(target >= 4)")
        d = lim["dispatch_us"]
        print(f"  pluggy dispatch               {d['pluggy_us']:.2f} us/packet "
              f"(direct {d['direct_us']:.2f})")
    st = res["startup"]
    print(f"\nour sender -> our receiver, separate processes over loopback (xfer: first "
          f"packet to last SYNC; wall: process start to exit; cpu S/R: sender/receiver CPU "
          f"seconds incl. ~{st['cpu_s']:.2f} s interpreter start-up; rss: ru_maxrss MiB incl. "
          f"mapped file pages; anon: peak RssAnon MiB sampled from /proc)")
    if res.get("slow_note"):
        print(f"  {res['slow_note']}")
    print(ROW_HEAD)
    for row in res["runs"]:
        print(_row_line(row))
    rss = res.get("rss") or {}
    if rss.get("runs"):
        a, b = rss["sizes_mib"]
        print(f"\npeak memory against image size (none x2, {a} vs {b} MiB):")
        for row in rss["runs"]:
            print(_row_line(row))
        if "sender_maxrss_kib_ratio" in rss:
            print(f"  ratio {b}/{a} MiB: sender ru_maxrss {rss['sender_maxrss_kib_ratio']}, "
                  f"RssAnon {rss['sender_rss_anon_peak_kib_ratio']}; receiver ru_maxrss "
                  f"{rss['receiver_maxrss_kib_ratio']}, RssAnon "
                  f"{rss['receiver_rss_anon_peak_kib_ratio']} -> anonymous memory within 10%: "
                  f"{'yes' if rss['anon_within_10pct'] else 'NO'}")
    links = res.get("links") or {}
    if links.get("skipped"):
        print(f"\nrate-limited links: skipped ({links['skipped']})")
    for entry in links.get("links", []):
        p = entry["probe"]
        print(f"\nlink {entry['rate']} (tbf, two namespaces, {links['channels']} channels, "
              f"{links['image_mib']} MiB image): bare sockets {p['bytes_per_s'] / 1e6:.0f} MB/s")
        print(ROW_HEAD)
        for row in entry["runs"]:
            print(_row_line(row))
        a = entry["auto"]
        pred = ", ".join(f"{c['label']} {c['predicted_s']:.2f}s ({c['bound']})"
                         for c in a["candidates"])
        print(f"  auto picks {a['choice']}; fastest measured {a.get('fastest_measured')} "
              f"({a.get('fastest_measured_s')} s); auto's pick measured "
              f"{a.get('choice_measured_s')} s (regret {a.get('regret')})")
        print(f"  predictions: {pred}")
    w = res.get("wall") or {}
    if w.get("cases"):
        from benchmarks.bench_wall import print_report as print_wall

        print_wall(w)
    elif w:
        print(f"\nwall: {w.get('skipped') or w.get('error')}")
    q = res.get("qemu") or {}
    if q.get("skipped"):
        print(f"\nQEMU rows: skipped ({q['skipped']})")
    elif q.get("rows"):
        from benchmarks.bench_qemu import print_cells

        print(f"\nQEMU ({q['guest']}):")
        cells = [r for r in q["rows"] if "ratios" in r]
        for r in q["rows"]:
            if "ratios" not in r:
                print(f"{r['method']:<8}    {r.get('error')}")
        print_cells(cells, q.get("repeat", 1), q.get("warm_gib", 0.0))
        if q.get("mapped_ram"):
            from benchmarks.bench_qemu import print_mapped_ram

            print("\nQEMU mapped-ram files (same guest; N channels = N threads; ms, wall; ours "
                  "durable and verified; ratio = ours / QEMU's, target <= 1.3):")
            print_mapped_ram(q["mapped_ram"])
    print(f"\ntotal {res['seconds']:.0f} s")


# ----------------------------------------------------------------------------- entry point


def run(opts: Any) -> int:
    started = time.perf_counter()
    _use_local_qatzip()
    opts.size_mib = opts.size_mib or (16 if opts.quick else 1024)
    opts.channel_list = opts.channels or ([2] if opts.quick else [1, 2, 4])
    opts.slow_mib = min(opts.slow_size_mib, opts.size_mib)
    opts.link_mib = min(opts.link_size_mib, opts.size_mib)
    opts.link_rates = LINK_RATES[:1] if opts.quick else LINK_RATES
    registry = default_registry()
    if opts.methods:
        for name in opts.methods:
            registry.get(name)  # unknown: the registry's error names what to install
    variants = method_variants(registry, opts.methods, opts.quick)
    own_scratch = opts.workdir is None
    opts.scratch = opts.workdir or tempfile.mkdtemp(prefix="bench-", dir=cache_dir())
    os.makedirs(opts.scratch, exist_ok=True)
    res: dict[str, Any] = {
        "version": 1, "command": ["multifd", *sys.argv[1:]] if sys.argv[0].endswith(
            ("multifd", "cli.py")) else sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
                 "kernel": platform.release(), "python": platform.python_version()},
        "options": {"size_mib": opts.size_mib, "quick": opts.quick,
                    "channels": opts.channel_list, "slow_size_mib": opts.slow_mib,
                    "link_size_mib": opts.link_mib},
    }
    try:
        sizes = {opts.size_mib, opts.slow_mib, opts.link_mib}
        if not opts.no_rss and "rss" in (opts.sections or SECTIONS):
            sizes.add(opts.size_mib * 4)
        t0 = time.perf_counter()
        images = {mib: mixed_image_path(mib) for mib in sorted(sizes)}
        res["image"] = {"size_mib": opts.size_mib, "path": images[opts.size_mib],
                        "ready_s": round(time.perf_counter() - t0, 2),
                        "mix": "40% zero / 30% text-like / 30% random pages, seed 42"}
        res["startup"] = startup_cost().as_dict()
        res["limits"] = section_limits(opts, images[opts.size_mib])
        slow = sorted({f"{m}:{lv}" for m, lv, _ in variants if is_slow(m, lv)})
        if slow and opts.slow_mib != opts.size_mib:
            res["slow_note"] = (f"{', '.join(slow)} run on a {opts.slow_mib} MiB image "
                                f"(slow at {opts.size_mib} MiB); compare their GB/s")
        res["engines_note"] = ("engine is the sender's (--engine); the receiver process picks "
                               "its method's first available engine")
        want = set(opts.sections or SECTIONS)
        res["wall"] = section_wall(opts) if "wall" in want else {"skipped": "--sections"}
        res["runs"] = section_matrix(opts, variants, images) if "matrix" in want else []
        res["rss"] = {"skipped": "--no-rss"} if opts.no_rss or "rss" not in want \
            else section_rss(opts, images)
        res["links"] = {"skipped": "--no-link"} if opts.no_link or "links" not in want \
            else section_links(opts, variants, images, res["limits"])
        res["qemu"] = section_qemu(opts) if opts.qemu and "qemu" in want \
            else {"skipped": "not requested (--qemu)"}
    finally:
        if own_scratch:
            shutil.rmtree(opts.scratch, ignore_errors=True)
    res["host"]["loadavg_end"] = list(os.getloadavg())
    res["seconds"] = round(time.perf_counter() - started, 1)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=1, default=_jsonable)
            f.write("\n")
    print_report(res)
    if opts.charts:
        from benchmarks.bench_charts import draw_charts

        for path in draw_charts(res, opts.charts):
            print(f"chart: {path}")
    failed = [r for r in res["runs"] if "error" in r]
    return 1 if failed else 0


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


if __name__ == "__main__":
    import argparse

    from multifd_core.bench import add_parser

    parser = argparse.ArgumentParser(prog="bench_suite")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    sys.exit(run(parser.parse_args(["bench", *sys.argv[1:]])))
