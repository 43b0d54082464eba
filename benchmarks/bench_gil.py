"""How often does the conformance kit's GIL verdict err? N verdicts per codec, counted.

GIL-holding codecs (every pass is a false pass):
  pydll-zlib    libz's compress2/uncompress through ctypes.PyDLL (the call keeps the GIL)
  pydll-lz4     liblz4 through ctypes.PyDLL: a fast codec, so the kit's own work weighs more
  cffi-holding  cffi API mode (compiled here), the C function takes the GIL around compress2
  pure-python   a per-page Python loop of bytes.translate (no call releases the GIL)
Shipped codecs (every fail is a false failure): zlib, zstd, qatzip software, qpl and uadk
software (multifd-pagecodec), lz4 (liblz4 and python-lz4).

    python -m benchmarks.bench_gil [--runs 100] [--busy 3] [--only zlib,pydll-zlib] [--json F]

``--busy K`` starts K busy-looping processes for the run ("loaded"; this machine has 2 CPUs).
Prints pass/fail counts, the false ones, the verdict time and the load average.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_hw import use_checkout_libqatzip
from multifd_core.gilcheck import gil_verdict
from multifd_core.methods.hookspecs import hookimpl
from multifd_core.methods.method import Method, MethodOptions

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


class WholePacket(Method):
    """A stateless test method: the packet's pages through ``encode``/``decode`` whole."""

    code = 0x0E
    description = "GIL check variant (benchmark only)"

    def max_payload(self, normal_pages: int) -> int:
        return 2 * normal_pages * self.page_size + 1024

    def encode(self, data: memoryview) -> Any:
        raise NotImplementedError

    def decode(self, payload: memoryview, size: int) -> Any:
        raise NotImplementedError

    @hookimpl
    def send_prepare(self, channel: Any, packet: Any) -> list[Any]:
        return [self.encode(packet.data())]

    @hookimpl
    def recv(self, channel: Any, packet: Any) -> None:
        packet.write_pages(self.decode(packet.read_payload(), packet.expected_size))


class PyDllZlib(WholePacket):
    """libz through ``ctypes.PyDLL``: C calls that keep the GIL."""

    name = "pydll-zlib"
    lib = ctypes.PyDLL(ctypes.util.find_library("z") or "libz.so.1")

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.out = ctypes.create_string_buffer(2 * 128 * self.page_size + 1024)
        self.pages = ctypes.create_string_buffer(128 * self.page_size)

    def encode(self, data: memoryview) -> Any:
        n = ctypes.c_ulong(len(self.out))
        src = (ctypes.c_char * len(data)).from_buffer_copy(data)
        if self.lib.compress2(self.out, ctypes.byref(n), src, len(data), 1) != 0:
            raise RuntimeError("compress2 failed")
        return memoryview(self.out)[:n.value]

    def decode(self, payload: memoryview, size: int) -> Any:
        n = ctypes.c_ulong(size)
        src = (ctypes.c_char * len(payload)).from_buffer_copy(payload)
        if self.lib.uncompress(self.pages, ctypes.byref(n), src, len(payload)) != 0:
            raise RuntimeError("uncompress failed")
        return memoryview(self.pages)[:n.value]


class PyDllLz4(PyDllZlib):
    """liblz4 through ``ctypes.PyDLL``: fast, so the GIL is held for short calls."""

    name = "pydll-lz4"
    lib = ctypes.PyDLL(ctypes.util.find_library("lz4") or "liblz4.so.1")

    def encode(self, data: memoryview) -> Any:
        src = (ctypes.c_char * len(data)).from_buffer_copy(data)
        n = self.lib.LZ4_compress_default(src, self.out, len(data), len(self.out))
        return memoryview(self.out)[:n]

    def decode(self, payload: memoryview, size: int) -> Any:
        src = (ctypes.c_char * len(payload)).from_buffer_copy(payload)
        n = self.lib.LZ4_decompress_safe(src, self.pages, len(payload), size)
        return memoryview(self.pages)[:max(n, 0)]


class PurePython(WholePacket):
    """A per-page Python loop of ``bytes.translate``: nothing releases the GIL."""

    name = "pure-python"
    table = bytes(range(255, -1, -1))

    def encode(self, data: memoryview) -> Any:
        ps, t = self.page_size, self.table
        return b"".join(bytes(data[o:o + ps]).translate(t) for o in range(0, len(data), ps))

    def decode(self, payload: memoryview, size: int) -> Any:
        return self.encode(payload)  # translate by this table is its own inverse


_HOLDING_C = """
#include <zlib.h>
/* Keeps the GIL for the whole call, as a binding that forgot to release it would. */
static int held_compress(unsigned char *d, unsigned long *dn, const unsigned char *s,
                         unsigned long sn) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = compress2(d, dn, s, sn, 1);
    PyGILState_Release(g);
    return rc;
}
static int held_uncompress(unsigned char *d, unsigned long *dn, const unsigned char *s,
                           unsigned long sn) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = uncompress(d, dn, s, sn);
    PyGILState_Release(g);
    return rc;
}
"""


def cffi_holding(workdir: str) -> type[WholePacket]:
    """A cffi API-mode module (compiled into ``workdir``) whose calls hold the GIL."""
    import importlib.util

    import cffi

    builder = cffi.FFI()
    builder.cdef("int held_compress(unsigned char *, unsigned long *, const unsigned char *, "
                 "unsigned long); int held_uncompress(unsigned char *, unsigned long *, "
                 "const unsigned char *, unsigned long);")
    builder.set_source("_gil_holding", _HOLDING_C, libraries=["z"])
    builder.compile(tmpdir=workdir, verbose=False)
    built = next(Path(workdir).glob("_gil_holding*.so"))
    spec = importlib.util.spec_from_file_location("_gil_holding", built)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ffi, lib = mod.ffi, mod.lib

    class CffiHolding(WholePacket):
        name = "cffi-holding"

        def __init__(self, options: MethodOptions | None = None) -> None:
            super().__init__(options)
            self.out = ffi.new("unsigned char[]", 2 * 128 * self.page_size + 1024)
            self.pages = ffi.new("unsigned char[]", 128 * self.page_size)
            self.n = ffi.new("unsigned long *")

        def encode(self, data: memoryview) -> Any:
            self.n[0] = len(self.out)
            with ffi.from_buffer(data) as src:
                lib.held_compress(self.out, self.n, src, len(data))
            return ffi.buffer(self.out, self.n[0])

        def decode(self, payload: memoryview, size: int) -> Any:
            self.n[0] = size
            with ffi.from_buffer(payload) as src:
                lib.held_uncompress(self.pages, self.n, src, len(payload))
            return ffi.buffer(self.pages, self.n[0])

    return CffiHolding


def variants(workdir: str) -> list[tuple[str, bool, Callable[[], Method]]]:
    """(name, releases the GIL, factory) of every codec measured."""
    from multifd_core.methods.registry import default_registry

    reg = default_registry()

    def shipped(method: str, **opts: Any) -> Callable[[], Method]:
        cls = reg.get(method).cls
        return lambda: cls(MethodOptions(page_size=PAGE, **opts))

    out: list[tuple[str, bool, Callable[[], Method]]] = [
        (c.name, False, lambda c=c: c(MethodOptions(page_size=PAGE)))
        for c in (PyDllZlib, PyDllLz4, cffi_holding(workdir), PurePython)]
    out += [
        ("zlib", True, shipped("zlib", level=1)),
        ("zstd", True, shipped("zstd", level=1)),
        ("qatzip software", True, shipped("qatzip", engine="software", level=1)),
        ("qpl software (pagecodec)", True, shipped("qpl", engine="software")),
        ("uadk software (pagecodec)", True,
         shipped("uadk", engine="software", extra={"software_compress": True})),
        ("lz4 liblz4", True, shipped("lz4", engine="liblz4")),
        ("lz4 python-lz4", True, shipped("lz4", engine="python-lz4")),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--busy", type=int, default=0, help="busy processes to start (loaded)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--json", metavar="PATH", help="write the counts as JSON")
    args = ap.parse_args(argv)
    use_checkout_libqatzip()
    only = {v.strip() for v in args.only.split(",") if v.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the busy processes go with us
    busy = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
            for _ in range(args.busy)]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="multifd-gil-") as work:
            print(f"{args.runs} verdicts per codec; {args.busy} busy processes; "
                  f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
            print(f"{'codec':<27} {'holds?':<7} {'pass':>4} {'fail':>4} {'false':>5} "
                  f"{'windows':>7} {'s/verdict':>9} {'load':>9}")
            for name, releases, make in variants(work):
                if only and name not in only:
                    continue
                load0 = os.getloadavg()[0]
                start = time.perf_counter()
                verdicts = [gil_verdict(make, PAGE) for _ in range(args.runs)]
                took = (time.perf_counter() - start) / args.runs
                passed = sum(v.releases for v in verdicts)
                false = args.runs - passed if releases else passed
                windows = sum(len(v.windows) for v in verdicts) / args.runs
                load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
                rows.append({"codec": name, "releases_gil": releases, "runs": args.runs,
                             "pass": passed, "fail": args.runs - passed, "false": false,
                             "mean_windows": windows, "seconds_per_verdict": took,
                             "busy": args.busy, "load": load})
                print(f"{name:<27} {'no' if releases else 'yes':<7} {passed:>4} "
                      f"{args.runs - passed:>4} {false:>5} {windows:>7.1f} {took:>9.2f} "
                      f"{load:>9}", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print("false = passes of a GIL-holding codec, or failures of a releasing one")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(r["false"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
