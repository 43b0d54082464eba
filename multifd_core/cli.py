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
from multifd_core.session import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_RAM,
    FileOutput,
    ReceiveSession,
    send_session,
)
from multifd_core.transport import (
    client_context,
    is_loopback,
    listen,
    parse_address,
    server_context,
)
from multifd_core.units import parse_size

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
                             connect_timeout=args.connect_timeout, on_sender=progress.attach,
                             tls=_client_tls(args), tls_hostname=args.tls_hostname)
    finally:
        progress.close()
    _print_summary(stats.as_dict(), args.json)
    return 0


def _client_tls(args: argparse.Namespace) -> Any:
    if not (args.tls_ca or args.tls_cert):
        return None
    return client_context(args.tls_ca, args.tls_cert, args.tls_key)


def _server_tls(args: argparse.Namespace) -> Any:
    if not args.tls_cert:
        if args.tls_key or args.tls_ca or args.tls_verify_peer:
            raise MultiFDError("TLS on recv needs --tls-cert (and --tls-key unless the "
                               "certificate file holds the key)")
        return None
    return server_context(args.tls_cert, args.tls_key, args.tls_ca,
                          verify_peer=args.tls_verify_peer)


def cmd_recv(args: argparse.Namespace) -> int:
    addr = parse_address(args.listen)
    if addr.kind == "tcp" and not is_loopback(addr.host) and not args.allow_remote:
        raise MultiFDError(f"refusing to listen on {addr.host}: recv listens on loopback unless "
                           "--allow-remote is given")
    if not 1 <= args.max_channels <= 255:
        raise MultiFDError(f"--max-channels {args.max_channels} out of range 1..255")
    tls = _server_tls(args)
    listener = listen(addr)
    out = FileOutput(args.out, preallocate=not args.sparse)
    out.start()  # an earlier run's manifest.json goes first: this run may fail
    ok = False

    def commit(stats: Any) -> None:
        out.commit(stats.digests, {"method": stats.method, "page_size": stats.page_size,
                                   "statistics": stats.as_dict()})

    try:
        session = ReceiveSession(listener, out.allocate, method=args.compression,
                                 timeout=args.timeout, max_channels=args.max_channels,
                                 max_ram=args.max_ram, tls=tls, on_verified=commit,
                                 max_memory=args.max_memory, reserve=out.reserve,
                                 engine=args.engine)
        stats = session.serve()
        ok = True
    finally:
        if ok or args.keep_partial:
            out.close()
        else:
            out.discard()
        listener.close()
        if addr.kind == "unix":
            try:
                os.unlink(addr.path)
            except OSError:
                pass
    _print_summary(stats.as_dict(), args.json)
    return 0


def _add_tls(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("TLS (main and multifd channels, as QEMU's tls-creds)")
    g.add_argument("--tls-cert", metavar="PEM",
                   help="this end's certificate (required on recv for TLS; on send, presented "
                        "for mutual authentication)")
    g.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    g.add_argument("--tls-ca", metavar="PEM",
                   help="CA certificate(s) that sign the peer's certificate" +
                        ("" if server else "; enables TLS on send"))
    if server:
        g.add_argument("--tls-verify-peer", action="store_true",
                       help="require a client certificate signed by --tls-ca")
    else:
        g.add_argument("--tls-hostname", metavar="NAME", default=None,
                       help="name the receiver's certificate must carry (default: the host)")


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
    auto = summary.get("auto")
    if auto:
        best = auto["candidates"][0]
        print(f"auto: link {auto['link_bytes_per_s'] / 1e6:.0f} MB/s; predicted "
              f"{best['label']} {best['predicted_s']:.2f} s; chose {auto['choice']}")


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
                   help="force a method, or 'auto' to pick one from a short measurement of the "
                        "link and the data (default: the first the receiver accepts)")
    s.add_argument("--channels", "-n", type=int, default=2)
    s.add_argument("--level", type=int, default=None)
    s.add_argument("--engine", default=None, help="preferred engine of the method")
    s.add_argument("--page-size", type=int, default=4096)
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without progress before giving up")
    s.add_argument("--connect-timeout", type=float, default=10.0)
    s.add_argument("--json", action="store_true", help="print one JSON summary")
    _add_tls(s, server=False)
    s.set_defaults(func=cmd_send)

    r = sub.add_parser("recv", help="receive one session into a directory (recv serves "
                                    "exactly one session, then exits)")
    r.add_argument("--listen", required=True, metavar="ADDRESS")
    r.add_argument("--out", required=True, metavar="DIR")
    r.add_argument("--compression", "-c", metavar="METHOD", default=None)
    r.add_argument("--engine", default=None,
                   help="engine of the negotiated method to decode with (default: the best "
                        "available here)")
    r.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without progress before giving up (also: how long to wait "
                        "for a sender)")
    r.add_argument("--max-channels", type=int, default=255,
                   help="refuse sessions with more multifd channels")
    r.add_argument("--max-ram", type=parse_size, default=DEFAULT_MAX_RAM, metavar="SIZE",
                   help="refuse sessions declaring more RAM in all (default 1T)")
    r.add_argument("--max-memory", type=parse_size, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                   help="refuse sessions whose receive buffers and decoder state (per channel, "
                        "times the channels) could exceed this (default 1G)")
    r.add_argument("--sparse", action="store_true",
                   help="keep output files sparse instead of reserving their space up front "
                        "(a disk that fills up mid-session then fails the session)")
    r.add_argument("--keep-partial", action="store_true",
                   help="keep the *.partial files of a failed session")
    r.add_argument("--allow-remote", action="store_true",
                   help="allow listening on a non-loopback address")
    r.add_argument("--json", action="store_true")
    _add_tls(r, server=True)
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
