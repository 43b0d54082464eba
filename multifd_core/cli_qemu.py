"""``multifd qemu capture``, ``replay``, ``import`` and ``export``: registered by the main CLI."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid as uuidlib
from typing import Any

from multifd_core.cliargs import add_wait_first, channel_count, int_range, parse_size, seconds
from multifd_core.errors import MultiFDError, UsageError
from multifd_core.session.limits import DEFAULT_MAX_MEMORY
from multifd_core.session.transport import Address, parse_address

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _uuid(text: str) -> bytes:
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def add_qemu_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``qemu`` command group with ``capture`` and ``replay``."""
    q = subparsers.add_parser("qemu", help="interoperate with a real QEMU 10.0 migration")
    qsub = q.add_subparsers(dest="qemu_command", required=True)

    c = qsub.add_parser("capture", help="be the destination of a QEMU multifd migration and "
                                        "save its RAM blocks and device state",
                        description="Be the destination of a QEMU 10.0 multifd migration "
                                    "(the source runs migrate to tcp:HOST:PORT) and save its "
                                    "RAM blocks, device state and manifest.json in DIR (or a "
                                    "mapped-ram FILE).")
    c.add_argument("--listen", default="tcp:127.0.0.1:4444", metavar="tcp:HOST:PORT",
                   help="address to listen on (host defaults to 127.0.0.1; port 0 picks one)")
    c.add_argument("--channels", "-n", type=channel_count, default=2,
                   help="the source's multifd-channels, 1..255")
    c.add_argument("--compression", "-c", default="none", metavar="METHOD",
                   help="the source's multifd-compression")
    out = c.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="DIR",
                     help="write a capture directory (this or --mapped-ram is required)")
    out.add_argument("--mapped-ram", metavar="FILE",
                     help="write a QEMU mapped-ram file instead (restore it with "
                          "migrate-incoming file:FILE and the mapped-ram capability; default: "
                          "--out)")
    c.add_argument("--uuid", type=_uuid, default=None,
                   help="the source's -uuid: channels with another uuid are refused (default: "
                        "the first uuid whose channels all connect is the source's)")
    c.add_argument("--level", type=int, default=None,
                   help="the source's multifd-zstd-level/zlib-level, if known (zstd then "
                        "accepts only that level's window; default: any QEMU level's)")
    c.add_argument("--max-memory", type=parse_size, default=DEFAULT_MAX_MEMORY,
                   metavar="SIZE", help="refuse to start if the channels' receive buffers and "
                                        "decoder state could exceed this (default: 1G)")
    c.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds without progress before giving up, once the source is in")
    add_wait_first(c, "the source's first connection")
    c.add_argument("--allow-remote", action="store_true",
                   help="allow listening on a non-loopback address")
    c.add_argument("--json", action="store_true", help="print the manifest as JSON")
    c.set_defaults(func=cmd_capture)

    r = qsub.add_parser("replay", help="send a capture (or a QEMU mapped-ram file) to a QEMU "
                                       "destination started with -incoming",
                        description="Send a capture (made by `multifd qemu capture`) or a "
                                    "mapped-ram file to a QEMU 10.0 destination started with "
                                    "-incoming.")
    r.add_argument("dir", metavar="DIR|FILE", help="a capture directory, or a mapped-ram file "
                                                   "saved by QEMU or by `qemu export`")
    r.add_argument("--offset", type=_offset, default=0,
                   help="a mapped-ram FILE's stream offset (file:PATH,offset=N)")
    r.add_argument("address", metavar="tcp:HOST:PORT", help="the destination's -incoming")
    r.add_argument("--channels", "-n", type=channel_count, default=2,
                   help="the destination's multifd-channels")
    r.add_argument("--compression", "-c", default="none", metavar="METHOD",
                   help="the destination's multifd-compression (any method, whatever the "
                        "capture used)")
    r.add_argument("--level", type=int, default=None,
                   help="the method's level (default: the method's default)")
    r.add_argument("--uuid", type=_uuid, default=bytes(16),
                   help="the destination's -uuid (default: none, all zeros)")
    r.add_argument("--switchover-start", choices=("auto", "on", "off"), default="auto",
                   help="send SWITCHOVER_START before RAM END (auto: as captured)")
    r.add_argument("--no-verify", action="store_true", help="skip the digest checks")
    r.add_argument("--timeout", type=seconds, default=60.0,
                   help="seconds without progress before giving up")
    r.add_argument("--json", action="store_true", help="print one JSON summary")
    r.set_defaults(func=cmd_replay)

    i = qsub.add_parser("import", help="read a QEMU mapped-ram file (migrate file: with "
                                       "mapped-ram) into a capture directory")
    i.add_argument("file", metavar="FILE", help="the mapped-ram file QEMU saved")
    i.add_argument("--out", required=True, metavar="DIR",
                   help="the capture directory to write (required)")
    i.add_argument("--offset", type=_offset, default=0,
                   help="where the stream starts in FILE (file:PATH,offset=N)")
    i.add_argument("--threads", "-j", type=_threads, default=4,
                   help="threads reading and writing blocks, 1..64")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_import)

    e = qsub.add_parser("export", help="write a capture directory as a mapped-ram file that "
                                       "QEMU restores with migrate-incoming file:FILE")
    e.add_argument("dir", metavar="DIR", help="the capture directory")
    e.add_argument("file", metavar="FILE", help="the mapped-ram file to write")
    e.add_argument("--offset", type=_offset, default=0,
                   help="start the stream at this offset of FILE (restore with "
                        "file:FILE,offset=N)")
    e.add_argument("--threads", "-j", type=_threads, default=4,
                   help="threads reading and writing blocks, 1..64")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the check of each block's digest against the manifest")
    e.add_argument("--json", action="store_true", help="print one JSON summary")
    e.set_defaults(func=cmd_export)
    return q


def _offset(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an offset: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"offset {value} is negative")
    return value


_threads = int_range("thread count", 1, 64)


def _tcp_address(text: str, what: str) -> Address:
    """``text`` as a tcp: address; a usage error (exit 2) for anything else."""
    try:
        addr = parse_address(text)
    except MultiFDError as exc:
        raise UsageError(str(exc)) from None
    if addr.kind != "tcp":
        raise UsageError(f"{what} tcp:HOST:PORT only")
    return addr


def cmd_capture(args: argparse.Namespace) -> int:
    from multifd_core.qemu.capture import QemuCapture

    addr = _tcp_address(args.listen, "qemu capture listens on")
    if addr.host not in LOOPBACK and not args.allow_remote:
        raise UsageError(f"refusing to listen on {addr.host}: capture listens on loopback "
                         "unless --allow-remote is given")
    target = args.out or args.mapped_ram
    cap = QemuCapture(args.out or os.path.dirname(os.path.abspath(args.mapped_ram)),
                      channels=args.channels, method=args.compression,
                      level=args.level, uuid=args.uuid, timeout=args.timeout,
                      max_memory=args.max_memory, mapped_ram=args.mapped_ram,
                      wait_first=args.wait_first)
    host, port = cap.listen(addr.host, addr.port)
    print(f"multifd: listening on tcp:{host}:{port}", file=sys.stderr, flush=True)
    manifest = cap.run()
    if args.json:
        print(json.dumps(manifest))
        return 0
    st = manifest["statistics"]
    print(f"captured {manifest['machine']} ({manifest['sync_mode']}, {manifest['method']}, "
          f"{manifest['channels']} channels): {len(manifest['blocks'])} blocks, "
          f"{sum(b['length'] for b in manifest['blocks']) / 2**20:.1f} MiB RAM, "
          f"{st['normal_pages']} normal + {st['zero_pages']} zero pages, "
          f"{st['sync_rounds']} sync rounds, device state {manifest['tail']['device_bytes']} B, "
          f"{st['seconds']:.3f} s -> {target}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from multifd_core.qemu.replay import load_capture, replay

    addr = _tcp_address(args.address, "qemu replay connects to")
    if os.path.isdir(args.dir):
        capture = load_capture(args.dir, verify=not args.no_verify, verify_blocks=False)
        verify = not args.no_verify
    else:
        from multifd_core.qemu.snapshot import load_file_capture

        capture = load_file_capture(args.dir, file_offset=args.offset)
        verify = False
    sw = {"auto": None, "on": True, "off": False}[args.switchover_start]
    try:
        stats = replay(capture, addr, channels=args.channels, method=args.compression,
                       level=args.level, uuid=args.uuid, timeout=args.timeout,
                       switchover_start=sw, verify=verify)
    finally:
        capture.close()
    if args.json:
        print(json.dumps(stats.as_dict()))
        return 0
    print(f"replayed {capture.manifest['machine']} to {addr} with {args.compression} on "
          f"{args.channels} channels: {stats.normal_pages} normal + {stats.zero_pages} zero "
          f"pages, wire {stats.wire_bytes / 2**20:.1f} MiB, {stats.seconds:.3f} s")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from multifd_core.qemu.snapshot import import_file

    manifest = import_file(args.file, args.out, threads=args.threads, file_offset=args.offset)
    if args.json:
        print(json.dumps(manifest))
        return 0
    st = manifest["statistics"]
    print(f"imported {manifest['machine']} from {args.file}: {len(manifest['blocks'])} blocks, "
          f"{sum(b['length'] for b in manifest['blocks']) / 2**20:.1f} MiB RAM, "
          f"{st['written_pages']} pages written ({st['present_pages']} stored in the file), "
          f"{st['seconds']:.3f} s -> {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from multifd_core.qemu.snapshot import export_capture

    result = export_capture(args.dir, args.file, threads=args.threads,
                            file_offset=args.offset, verify=not args.no_verify)
    if args.json:
        print(json.dumps(result))
        return 0
    st = result["statistics"]
    print(f"exported {args.dir} to {args.file}: {len(result['blocks'])} blocks, "
          f"{st['written_pages']} pages written, {st['zero_pages']} zero pages left out, "
          f"{result['size'] / 2**20:.1f} MiB file, {st['seconds']:.3f} s"
          + ("" if result["verified"] else " (digests not checked)"))
    return 0
