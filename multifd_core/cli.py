"""The ``multifd`` command line: methods, send, recv, demo, and the qemu and bench groups.

Output: results on stdout; on stderr only what multifd itself says (errors as one line,
``-v`` logs, the progress line on a terminal). Exit status: 0 done, 1 failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from multifd_core import __version__, _numpy  # noqa: F401  (_numpy: before numpy's first import)
from multifd_core.bench import add_parser as add_bench_parser
from multifd_core.cli_qemu import add_qemu_parser
from multifd_core.cliargs import (
    EXIT_USAGE,
    Parser,
    TopHelpFormatter,
    add_progress,
    add_wait_first,
    address,
    channel_count,
    parse_size,
    seconds,
)
from multifd_core.errors import MultiFDError, UsageError

EXIT_ERROR = 1

ENVIRONMENT = """\
environment:
  MULTIFD_PLUGINS=a,b        load only these plugins (empty: none; -name: all but name)
  MULTIFD_STRICT_PLUGINS=1   a plugin that fails to load is an error, not a report
  MULTIFD_CACHE=DIR          where demo and bench keep their image (default: ~/.cache/multifd)
  MULTIFD_QPL_ENGINE=software, MULTIFD_UADK_ENGINE=software
                             use only that method's software engine on this end
  MULTIFD_QATZIP_ENGINE=software|libqatzip
                             qatzip: only the software engine, or libqatzip even without a QAT
                             device (its default only with one)
  MULTIFD_QPL_LIBRARY, MULTIFD_UADK_LIBRARY, MULTIFD_QATZIP_LIBRARY, MULTIFD_LZ4_LIBRARY=PATH
                             the vendor library a plugin loads (default: the system's)
  MULTIFD_PAGECODEC=off      qpl/uadk software engines: the Python per-page loop, not the C helper
  MULTIFD_QEMU=PATH          the QEMU binary of the tests and bench (default: qemu-system-x86_64)
  OPENBLAS_NUM_THREADS=N     numpy's BLAS threads (default here: 1; multifd never calls BLAS,
                             and OpenBLAS's pool spins ~0.15 CPU-s per process at start)

Add -v (or -vv) before or after a command for logs: negotiation, engines, channels, rounds,
per-channel statistics, phase timings.
"""

log = logging.getLogger("multifd.cli")


def _add_verbose(parser: argparse.ArgumentParser, seen: set[int] | None = None) -> None:
    """``-v`` on every command, counted with the one before the command."""
    seen = set() if seen is None else seen
    if id(parser) in seen:
        return
    seen.add(id(parser))
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:
        for child in sub.choices.values():
            _add_verbose(child, seen)
    if not subs and not any("-v" in a.option_strings for a in parser._actions):
        parser.add_argument("-v", "--verbose", action="count", default=0, dest="verbose_sub",
                            help="log details to stderr (-vv: debug)")


# --------------------------------------------------------------------------- methods


def _methods_report(registry: Any) -> dict[str, Any]:
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
    return {"methods": methods, "failed": [f.as_dict() for f in registry.failed],
            "excluded": dict(registry.excluded)}


def cmd_methods(args: argparse.Namespace) -> int:
    from multifd_core.methods.registry import default_registry

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
            path = f", {e['path']}" if e.get("path") else ""
            state = "ok" if e["available"] else f"off: {e['reason']}"
            print(f"    engine {e['name']} ({e['kind']}{path}){where}: {state}")
    for f in report["failed"]:
        print(f"failed plugin {f['plugin']} ({f['distribution']}): {f['error']}")
    for name, dist in report["excluded"].items():
        print(f"excluded plugin {name} ({dist}): by MULTIFD_PLUGINS")
    return 0


# --------------------------------------------------------------------------- send and recv


def _parse_sources(items: Sequence[str], page_size: int) -> list[Any]:
    from multifd_core.engine.ram import RamBlock

    blocks = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(item), item
        blocks.append(RamBlock.from_file(path, name, page_size=page_size))
    return blocks


def _progress(args: argparse.Namespace, label: str) -> Any:
    from multifd_core.progress import Progress

    enabled = args.progress if args.progress is not None else (
        sys.stderr.isatty() and not args.json)
    return Progress(label, enabled=enabled)


def _check_method(args: argparse.Namespace, page_size: int) -> None:
    """A forced method, its level and engine are usable here (else a usage error)."""
    from multifd_core.methods.method import MethodOptions
    from multifd_core.methods.registry import default_registry

    if args.compression in (None, "auto"):
        return
    try:
        default_registry().create(args.compression, MethodOptions(
            page_size=page_size, level=getattr(args, "level", None), engine=args.engine))
    except MultiFDError as exc:
        raise UsageError(str(exc)) from None


def cmd_send(args: argparse.Namespace) -> int:
    from multifd_core.session import send_session
    from multifd_core.wire import check_page_size

    if len(args.items) < 2:
        raise UsageError("send needs at least one [NAME=]FILE and an address")
    *sources, last = args.items
    try:
        addr = address(last)
        check_page_size(args.page_size)
    except (argparse.ArgumentTypeError, MultiFDError) as exc:
        raise UsageError(str(exc)) from None
    _check_method(args, args.page_size)
    blocks = _parse_sources(sources, args.page_size)
    progress = _progress(args, "send")
    progress.measure(sum(b.used_length for b in blocks), lambda: 0)

    def attach(sender: Any) -> None:
        progress.measure(progress.total, lambda: (
            sender.stats.normal_pages + sender.stats.zero_pages) * sender.page_size)

    try:
        stats = send_session(blocks, addr, method=args.compression, channels=args.channels,
                             level=args.level, engine=args.engine, timeout=args.timeout,
                             connect_timeout=args.connect_timeout, on_sender=attach,
                             tls=_client_tls(args), tls_hostname=args.tls_hostname,
                             on_phase=progress.phase)
    finally:
        progress.close()
    _print_summary(stats.as_dict(), args.json)
    return 0


def _client_tls(args: argparse.Namespace) -> Any:
    from multifd_core.session.transport import client_context

    if not (args.tls_ca or args.tls_cert):
        return None
    return client_context(args.tls_ca, args.tls_cert, args.tls_key)


def _server_tls(args: argparse.Namespace) -> Any:
    from multifd_core.session.transport import server_context

    if not args.tls_cert:
        if args.tls_key or args.tls_ca or args.tls_verify_peer:
            raise UsageError("TLS on recv needs --tls-cert (and --tls-key unless the "
                             "certificate file holds the key)")
        return None
    return server_context(args.tls_cert, args.tls_key, args.tls_ca,
                          verify_peer=args.tls_verify_peer)


def cmd_recv(args: argparse.Namespace) -> int:
    from multifd_core.session import FileOutput, ReceiveSession
    from multifd_core.session.transport import is_loopback, listen

    addr = args.listen
    if addr.kind == "tcp" and not is_loopback(addr.host) and not args.allow_remote:
        raise UsageError(f"refusing to listen on {addr.host}: recv listens on loopback unless "
                         "--allow-remote is given")
    tls = _server_tls(args)
    listener = listen(addr)
    out = FileOutput(args.out, preallocate=not args.sparse)
    out.start()  # an earlier run's manifest.json goes first: this run may fail
    log.info("listening on %s; waiting for a sender %s", addr,
             "as long as it takes" if math.isinf(args.wait_first)
             else f"up to {args.wait_first:g} s")
    progress = _progress(args, "recv")
    ok = False

    def commit(stats: Any) -> None:
        out.commit(stats.digests, {"method": stats.method, "page_size": stats.page_size,
                                   "statistics": stats.as_dict()},
                   algorithm=stats.digest_algorithm)

    def attach(receiver: Any, hello: Any) -> None:
        progress.measure(sum(length for _, length in hello.blocks), lambda: sum(
            st.normal_pages + st.zero_pages for st in receiver.stats) * hello.page_size)

    try:
        session = ReceiveSession(listener, out.allocate, method=args.compression,
                                 timeout=args.timeout, max_channels=args.max_channels,
                                 max_ram=args.max_ram, tls=tls, on_verified=commit,
                                 max_memory=args.max_memory, reserve=out.reserve,
                                 engine=args.engine, wait_first=args.wait_first,
                                 on_phase=progress.phase, on_receiver=attach)
        stats = session.serve()
        ok = True
    finally:
        progress.close()
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
                        "for mutual authentication; default: none, no TLS)")
    g.add_argument("--tls-key", metavar="PEM",
                   help="the certificate's private key (default: in the --tls-cert file)")
    g.add_argument("--tls-ca", metavar="PEM",
                   help="CA certificate(s) that sign the peer's certificate" +
                        ("" if server else "; enables TLS on send") + " (default: none)")
    if server:
        g.add_argument("--tls-verify-peer", action="store_true",
                       help="require a client certificate signed by --tls-ca")
    else:
        g.add_argument("--tls-hostname", metavar="NAME", default=None,
                       help="name the receiver's certificate must carry (default: the host)")


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    from multifd_core.session.report import side_text

    if as_json:
        print(json.dumps(summary))
        return
    secs = summary["transfer_seconds"]
    print(f"{summary['method']}: {summary['ram_bytes'] / 2**20:.1f} MiB in {secs:.3f} s "
          f"({summary['throughput_bytes_per_s'] / 1e9:.2f} GB/s), wire "
          f"{summary['wire_bytes'] / 2**20:.1f} MiB, {summary['normal_pages']} normal + "
          f"{summary['zero_pages']} zero pages, ratio {summary['compression_ratio']:.2f}, "
          f"packets per channel {summary['packets_per_channel']}")
    engines = summary.get("engines") or {}
    print(f"sender:   {side_text(engines.get('sender'))}")
    print(f"receiver: {side_text(engines.get('receiver'))}")
    auto = summary.get("auto")
    if auto:
        best = auto["candidates"][0]
        print(f"auto: link {auto['link_bytes_per_s'] / 1e6:.0f} MB/s; predicted "
              f"{best['label']} {best['predicted_s']:.2f} s; chose {auto['choice']}")


def cmd_verify(args: argparse.Namespace) -> int:
    from multifd_core.session.verify import verify_directory

    checks = verify_directory(args.dir)
    bad = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"ok": not bad, "checks": [c.as_dict() for c in checks]}))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'BAD '} {c.file}: {c.detail}")
    if bad:
        raise MultiFDError(f"{len(bad)} of {len(checks)} files in {args.dir} differ from "
                           f"manifest.json (first: {bad[0].file}: {bad[0].detail})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from multifd_core.demo import run_demo

    return run_demo(size_mib=args.size_mib, channels=args.channels, methods=args.methods,
                    workdir=args.workdir, as_json=args.json)


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    from multifd_core.session.limits import DEFAULT_MAX_MEMORY, DEFAULT_MAX_RAM

    p = Parser(prog="multifd", description=__doc__, epilog=ENVIRONMENT,
               formatter_class=TopHelpFormatter)
    p.add_argument("--version", action="version", version=f"multifd {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log details to stderr (-vv: debug); also accepted after the command")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=Parser)

    m = sub.add_parser("methods", help="list installed methods, engines and failed plugins",
                       description="Installed methods with their codes, levels, distribution "
                                   "and engines (kind, native or fallback path, library, "
                                   "availability), failed and excluded plugins.")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_methods)

    s = sub.add_parser("send", help="send RAM images to a receiver",
                       description="Send RAM images to a `multifd recv` over N channels; exits "
                                   "0 once the receiver verified every block's digest (BLAKE3).")
    s.add_argument("items", nargs="+", metavar="[NAME=]FILE... ADDRESS",
                   help="files to send (block NAME defaults to the file name), then "
                        "tcp:HOST:PORT or unix:PATH")
    s.add_argument("--compression", "-c", metavar="METHOD", default=None,
                   help="force a method, or 'auto' to pick one from a short measurement of the "
                        "link and the data (default: the first the receiver accepts)")
    s.add_argument("--channels", "-n", type=channel_count, default=2,
                   help="multifd channels, 1..255")
    s.add_argument("--level", type=int, default=None,
                   help="the method's level (default: the method's default; `multifd "
                        "methods` lists the range)")
    s.add_argument("--engine", default=None,
                   help="engine of the method to encode with (default: the best available "
                        "here)")
    s.add_argument("--page-size", type=int, default=4096, help="bytes per page")
    s.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds without progress before giving up")
    s.add_argument("--connect-timeout", type=seconds, default=10.0,
                   help="seconds to keep trying to connect to the receiver")
    s.add_argument("--json", action="store_true", help="print one JSON summary")
    add_progress(s)
    _add_tls(s, server=False)
    s.set_defaults(func=cmd_send)

    r = sub.add_parser("recv", help="receive one session into a directory (recv serves "
                                    "exactly one session, then exits)",
                       description="Receive one session into DIR: NNN-name.ram files and "
                                   "manifest.json, written only after every block's digest "
                                   "matched the sender's.")
    r.add_argument("--listen", required=True, metavar="ADDRESS", type=address,
                   help="tcp:HOST:PORT or unix:PATH to listen on (required; port 0 picks one)")
    r.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the blocks and manifest.json (required; created)")
    r.add_argument("--compression", "-c", metavar="METHOD", default=None,
                   help="require this method (default: the sender's first offer this end can "
                        "run)")
    r.add_argument("--engine", default=None,
                   help="engine of the negotiated method to decode with (default: the best "
                        "available here)")
    r.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds without progress before giving up, once a sender is in")
    add_wait_first(r, "the sender")
    r.add_argument("--max-channels", type=channel_count, default=255,
                   help="refuse sessions with more multifd channels")
    r.add_argument("--max-ram", type=parse_size, default=DEFAULT_MAX_RAM, metavar="SIZE",
                   help="refuse sessions declaring more RAM in all (default: 1T)")
    r.add_argument("--max-memory", type=parse_size, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                   help="refuse sessions whose receive buffers and decoder state (per channel, "
                        "times the channels) could exceed this (default: 1G)")
    r.add_argument("--sparse", action="store_true",
                   help="keep output files sparse instead of reserving their space up front "
                        "(a disk that fills up mid-session then fails the session)")
    r.add_argument("--keep-partial", action="store_true",
                   help="keep the *.partial files of a failed session")
    r.add_argument("--allow-remote", action="store_true",
                   help="allow listening on a non-loopback address")
    r.add_argument("--json", action="store_true", help="print one JSON summary")
    add_progress(r)
    _add_tls(r, server=True)
    r.set_defaults(func=cmd_recv)

    v = sub.add_parser("verify", help="recheck a recv or qemu capture directory against its "
                                      "manifest.json (every block's digest and length)")
    v.add_argument("dir", metavar="DIR", help="the output directory")
    v.add_argument("--json", action="store_true", help="print one JSON report")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="the main job: migrate a generated 1 GiB mixed image with "
                                    "every installed method over loopback and verify it",
                       description="The main job: a generated mixed image (40% zero, 30% "
                                   "text, 30% random pages) migrated over loopback TCP with "
                                   "every installed method to a `multifd recv` process, "
                                   "verified; a table row per method.")
    d.add_argument("--size-mib", type=int, default=1024, help="image size in MiB")
    d.add_argument("--channels", type=channel_count, default=4, help="multifd channels")
    d.add_argument("--methods", nargs="*", default=None, metavar="METHOD",
                   help="methods to run (default: every installed, available one)")
    d.add_argument("--workdir", default=None,
                   help="where the receivers write (default: a temporary folder in the cache, "
                        "removed)")
    d.add_argument("--json", action="store_true", help="print one JSON report")
    d.set_defaults(func=cmd_demo)


    add_qemu_parser(sub)
    add_bench_parser(sub)
    _add_verbose(p)
    return p


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a caller may swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(verbose: int) -> None:
    """multifd's loggers to stderr: warnings always, ``-v`` INFO, ``-vv`` DEBUG. Only the
    ``multifd`` loggers get a handler: other libraries' logs stay off stderr."""
    root = logging.getLogger("multifd")
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(
        "multifd: %(name)s: %(message)s" if verbose > 1 else "multifd: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose + getattr(args, "verbose_sub", 0))
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"multifd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
