"""Peak RSS of a `multifd recv` process, by channel count (a script).

Two cases, each against a real `multifd recv` subprocess whose peak RSS (``ru_maxrss`` from
``wait4``) is printed:

* ``session``: a real `multifd send` of a mixed image with ``--compression`` (default zstd at
  its default level), 1, 8 and 64 channels;
* ``claims``: a hostile sender declares N zlib channels and, on every channel, a packet whose
  header claims the largest payload (1 MiB) without sending it: what a peer can make the
  receiver hold without sending data. The receiver's budget (``--max-memory``) is what bounds
  it; ``--max-memory`` is printed with each row, and a session beyond it is refused.

Usage::

    python -m benchmarks.bench_recv_memory [--channels 1 8 64] [--size-mib 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import free_port
from multifd_core import wire
from multifd_core.image import fill_mixed
from multifd_core.wire import protocol
from multifd_core.wire.protocol import Hello, Msg, Offer

CLI = [sys.executable, "-m", "multifd_core.cli"]
PS = 4096


class Recv:
    """A `multifd recv` subprocess and its peak RSS (VmHWM, sampled until it exits: the
    process's own high-water mark, reset at exec, unlike ``ru_maxrss``)."""

    def __init__(self, out: Path, port: int, *extra: str) -> None:
        self.proc = subprocess.Popen([*CLI, "recv", "--listen", f"tcp:127.0.0.1:{port}",
                                      "--out", str(out), "--timeout", "5", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.hwm_kib = 0
        self.anon_kib = 0  # the largest RssAnon sampled: memory, not the mapped output
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        status = f"/proc/{self.proc.pid}/status"
        while self.proc.poll() is None:
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
                        elif line.startswith("RssAnon:"):
                            self.anon_kib = max(self.anon_kib, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)

    def wait(self) -> tuple[int, str, str]:
        """Exit status, peak RSS (and anonymous RSS) in MiB, stderr."""
        _, err = self.proc.communicate()
        self._thread.join()
        rss = f"{self.hwm_kib / 1024:6.1f} MiB (anonymous {self.anon_kib / 1024:6.1f} MiB)"
        return self.proc.returncode, rss, err.decode().strip()


def connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 20
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def session(image: Path, channels: int, method: str, work: Path) -> None:
    port = free_port()
    out = work / f"out-{method}-{channels}"
    recv = Recv(out, port)
    send = subprocess.run([*CLI, "send", f"pc.ram={image}", f"tcp:127.0.0.1:{port}",
                           "--compression", method, "--channels", str(channels),
                           "--connect-timeout", "20"], capture_output=True, text=True)
    rc, rss, err = recv.wait()
    print(f"session  {method:<5} {channels:>3} channels: recv peak RSS {rss} "
          f"(exit {rc}, send exit {send.returncode}) {err[:100]}")


def claims(channels: int, max_memory: str, work: Path) -> None:
    port = free_port()
    recv = Recv(work / f"claims-{channels}", port, "--max-memory", max_memory)
    main = connect(port)
    uuid = os.urandom(16)
    hello = Hello(uuid, PS, channels, [("ram", 64 * PS)], [Offer("zlib", 2, "")], "zlib")
    main.sendall(protocol.encode(Msg.HELLO, hello.to_body()))
    head = main.recv(12)
    kind, length = protocol.decode_frame(head)
    answer = main.recv(length)
    socks = []
    if kind is Msg.ACCEPT:
        claim = wire.encode_ram_packet(page_size=PS, flags=0x02, packet_num=1, ramblock="ram",
                                       normal=[0], next_packet_size=1 << 20)
        for cid in range(channels):
            c = connect(port)
            c.sendall(wire.encode_init(uuid, cid) + bytes(claim) + b"x" * 4096)
            socks.append(c)
    sent = sum(64 + len(wire.encode_sync_packet(1, PS)) + 4096 for _ in socks)
    rc, rss, err = recv.wait()  # ends on its --timeout: the payloads never come
    for s in [main, *socks]:
        s.close()
    what = "accepted" if kind is Msg.ACCEPT else f"refused ({answer[:80]!r})"
    print(f"claims   zlib  {channels:>3} channels, --max-memory {max_memory:>5}: {what}; "
          f"{sent >> 10} KiB sent; recv peak RSS {rss} (exit {rc})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--method", default="zstd")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = work / "ram.img"
        buf = np.zeros(((args.size_mib << 20) // PS, PS), dtype=np.uint8)
        fill_mixed(buf, seed=1)
        image.write_bytes(buf.tobytes())
        del buf
        for n in args.channels:
            session(image, n, args.method, work)
        for n in args.channels:
            claims(n, "1G", work)
        claims(max(args.channels), "64M", work)


if __name__ == "__main__":
    main()
