"""Engine benchmark (not a test): our sender -> our receiver vs bare sockets, in one run.

    .venv/bin/python -m benchmarks.bench_engine [--size-mib 1024] [--channels 4] [--json PATH]

Measures, on the embedded mixed image:
  * engine: ``multifd recv`` (its own process, into sparse files) <- ``send_session`` with
    ``none``; transfer time (first packet to last SYNC) and end-to-end time (with digests);
  * bare: the same non-zero bytes pushed through plain Python sockets over the same number of
    connections to a receiving process that ``recv_into``s a reused buffer, and once into a
    fresh mmap'd sparse file (first-touch, what a receiver writing files must pay);
  * the zero-page scan rate on one core and the per-packet cost of the pluggy dispatch.
Figures are ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import free_port
from multifd_core.demo import mixed_image_path, run_pair
from multifd_core.engine.ram import RamBlock
from multifd_core.methods.context import ChannelContext, SendPacket
from multifd_core.methods.hookspecs import bind
from multifd_core.methods.registry import default_registry
from multifd_core.wire.pages import zero_mask

PS = 4096
CHUNK = 512 * 1024

_SINK = r"""
import mmap, os, socket, sys, threading
port, conns, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mode, path = sys.argv[4], sys.argv[5]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(64)
print("ready", flush=True)
if mode == "file":
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC); os.ftruncate(fd, total)
    mm = mmap.mmap(fd, total); view = memoryview(mm)
share = total // conns
def serve(i, s):
    if mode == "file":
        v = view[i * share:(i + 1) * share]; got = 0
        while got < len(v):
            n = s.recv_into(v[got:])
            if not n: break
            got += n
    else:
        buf = bytearray(1 << 20)
        while s.recv_into(buf):
            pass
ts = []
for i in range(conns):
    s, _ = ls.accept()
    t = threading.Thread(target=serve, args=(i, s)); t.start(); ts.append(t)
for t in ts: t.join()
print("done", flush=True)
"""


def bare_sockets(data: memoryview, conns: int, mode: str) -> float:
    """Seconds to push ``data`` over ``conns`` loopback connections to a sink process."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        sink = subprocess.Popen([sys.executable, "-c", _SINK, str(port), str(conns),
                                 str(len(data)), mode, os.path.join(tmp, "sink.img")],
                                stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        sink.stdout.readline()
        share = len(data) // conns
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
        start = time.perf_counter()

        def push(i: int) -> None:
            part = data[i * share : (i + 1) * share]
            for off in range(0, len(part), CHUNK):
                socks[i].sendall(part[off : off + CHUNK])
            socks[i].shutdown(socket.SHUT_WR)

        threads = [threading.Thread(target=push, args=(i,)) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sink.stdout.readline()
        elapsed = time.perf_counter() - start
        sink.wait()
        for s in socks:
            s.close()
    return elapsed


def zero_scan_rate(block: RamBlock) -> float:
    """Bytes per second of zero-page detection, packet by packet, on one core."""
    words = block.words
    step = 128
    start = time.perf_counter()
    for first in range(0, block.n_pages, step):
        zero_mask(words[first : first + step])
    return block.used_length / (time.perf_counter() - start)


def dispatch_cost(packets: int = 20000) -> dict[str, float]:
    """Microseconds per call: pluggy hook vs calling the method's function directly."""
    method = default_registry().create("none")
    hooks = bind(method)
    ctx = ChannelContext(0, PS)
    pages = np.zeros((128, PS), dtype=np.uint8)
    pkt = SendPacket.whole(pages, lambda n: memoryview(bytearray(n)))
    start = time.perf_counter()
    for _ in range(packets):
        hooks.send_prepare(channel=ctx, packet=pkt)
    via_pluggy = (time.perf_counter() - start) / packets
    start = time.perf_counter()
    for _ in range(packets):
        method.send_prepare(channel=ctx, packet=pkt)
    direct = (time.perf_counter() - start) / packets
    return {"pluggy_us": via_pluggy * 1e6, "direct_us": direct * 1e6,
            "overhead_us": (via_pluggy - direct) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()

    image = mixed_image_path(args.size_mib)
    block = RamBlock.from_file(image, "pc.ram")
    nonzero = np.flatnonzero(~zero_mask(block.words))
    payload = np.ascontiguousarray(block.pages[nonzero]).reshape(-1)
    data = memoryview(payload)
    results: dict[str, object] = {"size_mib": args.size_mib, "channels": args.channels,
                                  "nonzero_bytes": len(data)}

    engine = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(image)) as tmp:
        for i in range(args.repeat):
            row = run_pair(image, "none", args.channels, os.path.join(tmp, f"run{i}"))
            assert row["verified"], "engine output failed verification"
            engine.append(row)
    best = min(engine, key=lambda r: r["transfer_seconds"])
    bare_mem = min(bare_sockets(data, args.channels, "mem") for _ in range(args.repeat))
    bare_file = min(bare_sockets(data, args.channels, "file") for _ in range(args.repeat))
    scan = max(zero_scan_rate(block) for _ in range(3))
    dispatch = dispatch_cost()
    results.update(
        engine_transfer_s=best["transfer_seconds"], engine_end_to_end_s=best["elapsed"],
        bare_socket_s=bare_mem, bare_socket_into_file_s=bare_file,
        ratio_vs_bare=best["transfer_seconds"] / bare_mem,
        ratio_vs_bare_into_file=best["transfer_seconds"] / bare_file,
        zero_scan_gb_s=scan / 1e9, dispatch=dispatch)
    mib = args.size_mib
    print(f"image {mib} MiB, {len(data) / 2**20:.0f} MiB non-zero, {args.channels} channels, "
          f"best of {args.repeat}")
    print(f"  engine (none) transfer      {best['transfer_seconds']:7.3f} s  "
          f"({mib / 1024 / best['transfer_seconds']:.2f} GiB/s of RAM)")
    print(f"  engine end to end (+digests) {best['elapsed']:7.3f} s")
    print(f"  bare sockets -> buffer      {bare_mem:7.3f} s   engine/bare = "
          f"{results['ratio_vs_bare']:.2f}x (target <= 1.5x)")
    print(f"  bare sockets -> sparse file {bare_file:7.3f} s   engine/bare = "
          f"{results['ratio_vs_bare_into_file']:.2f}x")
    print(f"  zero-page scan, one core    {scan / 1e9:7.2f} GB/s (target >= 4)")
    print(f"  send_prepare via pluggy     {dispatch['pluggy_us']:7.2f} us/packet "
          f"(direct {dispatch['direct_us']:.2f} us, overhead {dispatch['overhead_us']:.2f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    block.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
