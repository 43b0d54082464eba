"""The ``multifd`` command line: methods, send, recv, demo, and the qemu and bench groups."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from multifd_core import __version__
from multifd_core.errors import MultiFDError
from multifd_core.ram import RamBlock
from multifd_core.registry import MethodRegistry, default_registry
from multifd_core.session import FileOutput, ReceiveSession, send_session
from multifd_core.transport import listen, parse_address

EXIT_ERROR = 1
EXIT_USAGE = 2


def _methods_report(registry: MethodRegistry) -> dict[str, Any]:
    methods = []
    for e in registry.entries():
        engines = [eng.as_dict() for eng in e.cls.engines()]
        ok, why = e.cls.available()
        lv = e.cls.levels
        methods.append({
            "name": e.name, "code": e.code, "distribution": e.distribution,
            "version": e.version, "engines": engines, "available": ok, "reason": why,
            "levels": None if lv is None else {"min": lv.minimum, "max": lv.maximum,
                                                "default": lv.default},
            "description": e.cls.description,
        })
    return {"methods": methods, "failed": [f.as_dict() for f in registry.failed]}


def cmd_methods(args: argparse.Namespace) -> int:
    report = _methods_report(default_registry())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'method':<10} {'code':<6} {'levels':<7} {'distribution':<24} status")
    for m in report["methods"]:
        lv = m["levels"]
        levels = "-" if lv is None else f"{lv['min']}-{lv['max']}"
        dist = f"{m['distribution']} {m['version']}"
        status = "available" if m["available"] else "unavailable"
        print(f"{m['name']:<10} {m['code']:#04x}   {levels:<7} {dist:<24} {status}")
        for e in m["engines"]:
            where = f" [{e['library']}" + (f" {e['library_version']}" if e.get(
                "library_version") else "") + "]" if e.get("library") else ""
            state = "ok" if e["available"] else f"off: {e['reason']}"
            print(f"    engine {e['name']} ({e['kind']}){where}: {state}")
    for f in report["failed"]:
        print(f"failed plugin {f['plugin']} ({f['distribution']}): {f['error']}")
    return 0


def _parse_sources(items: Sequence[str], page_size: int) -> list[RamBlock]:
    blocks = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(item), item
        blocks.append(RamBlock.from_file(path, name, page_size=page_size))
    return blocks


class Progress:
    """A one-line progress bar with throughput on a terminal (stderr)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.sender: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def attach(self, sender: Any) -> None:
        self.sender = sender
        if self.enabled:
            self._thread.start()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.wait(0.2):
            st = self.sender.stats
            done = (st.normal_pages + st.zero_pages) * self.sender.page_size
            rate = done / max(time.perf_counter() - start, 1e-6)
            frac = min(done / self.total, 1.0) if self.total else 1.0
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}%  {done / 2**20:9.1f} MiB  "
                             f"{rate / 1e9:6.2f} GB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\n")


def cmd_send(args: argparse.Namespace) -> int:
    if len(args.items) < 2:
        raise MultiFDError("send needs at least one [NAME=]FILE and an address")
    *sources, address = args.items
    addr = parse_address(address)
    blocks = _parse_sources(sources, args.page_size)
    total = sum(b.used_length for b in blocks)
    progress = Progress(total, enabled=sys.stderr.isatty() and not args.json)
    try:
        stats = send_session(blocks, addr, method=args.compression, channels=args.channels,
                             level=args.level, engine=args.engine, timeout=args.timeout,
                             connect_timeout=args.connect_timeout, on_sender=progress.attach)
    finally:
        progress.close()
    _print_summary(stats.as_dict(), args.json)
    return 0


def cmd_recv(args: argparse.Namespace) -> int:
    addr = parse_address(args.listen)
    if addr.kind == "tcp" and addr.host not in ("127.0.0.1", "::1", "localhost") \
            and not args.allow_remote:
        raise MultiFDError(f"refusing to listen on {addr.host}: recv listens on loopback unless "
                           "--allow-remote is given")
    out = FileOutput(args.out)
    listener = listen(addr)
    try:
        session = ReceiveSession(listener, out.allocate, method=args.compression,
                                 timeout=args.timeout, max_channels=args.max_channels)
        stats = session.serve()
        out.commit(stats.digests, {"method": stats.method, "page_size": stats.page_size,
                                   "statistics": stats.as_dict()})
    finally:
        out.close()
        listener.close()
        if addr.kind == "unix":
            try:
                os.unlink(addr.path)
            except OSError:
                pass
    _print_summary(stats.as_dict(), args.json)
    return 0


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    secs = summary["transfer_seconds"]
    print(f"{summary['method']}: {summary['ram_bytes'] / 2**20:.1f} MiB in {secs:.3f} s "
          f"({summary['throughput_bytes_per_s'] / 1e9:.2f} GB/s), wire "
          f"{summary['wire_bytes'] / 2**20:.1f} MiB, {summary['normal_pages']} normal + "
          f"{summary['zero_pages']} zero pages, ratio {summary['compression_ratio']:.2f}, "
          f"packets per channel {summary['packets_per_channel']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from multifd_core.demo import run_demo

    return run_demo(size_mib=args.size_mib, channels=args.channels, methods=args.methods,
                    workdir=args.workdir, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multifd", description=__doc__)
    p.add_argument("--version", action="version", version=f"multifd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="list installed methods, engines and failed plugins")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)

    s = sub.add_parser("send", help="send RAM images to a receiver")
    s.add_argument("items", nargs="+", metavar="[NAME=]FILE... ADDRESS",
                   help="files to send (block NAME defaults to the file name), then "
                        "tcp:HOST:PORT or unix:PATH")
    s.add_argument("--compression", "-c", metavar="METHOD", default=None,
                   help="force a method (default: the first the receiver accepts)")
    s.add_argument("--channels", "-n", type=int, default=2)
    s.add_argument("--level", type=int, default=None)
    s.add_argument("--engine", default=None, help="preferred engine of the method")
    s.add_argument("--page-size", type=int, default=4096)
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without progress before giving up")
    s.add_argument("--connect-timeout", type=float, default=10.0)
    s.add_argument("--json", action="store_true", help="print one JSON summary")
    s.set_defaults(func=cmd_send)

    r = sub.add_parser("recv", help="receive one session into a directory")
    r.add_argument("--listen", required=True, metavar="ADDRESS")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--compression", "-c", metavar="METHOD", default=None)
    r.add_argument("--timeout", type=float, default=60.0)
    r.add_argument("--max-channels", type=int, default=255)
    r.add_argument("--allow-remote", action="store_true",
                   help="allow listening on a non-loopback address")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recv)

    d = sub.add_parser("demo", help="the main job: migrate a generated 1 GiB mixed image with "
                                    "every installed method over loopback and verify it")
    d.add_argument("--size-mib", type=int, default=1024)
    d.add_argument("--channels", type=int, default=4)
    d.add_argument("--methods", nargs="*", default=None)
    d.add_argument("--workdir", default=None)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    for module, hook in (("multifd_core.qemu.cli", "add_qemu_parser"),
                         ("multifd_core.bench", "add_parser")):
        try:
            mod = __import__(module, fromlist=[hook])
        except ImportError:
            continue
        getattr(mod, hook)(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="multifd: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MultiFDError as exc:
        print(f"multifd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("multifd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
