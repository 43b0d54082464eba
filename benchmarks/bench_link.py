"""A rate-limited link between two network namespaces (veth pair + tbf qdisc), for the bench.

``Link("1gbit")`` creates namespaces ``mfdb<pid>s`` (sender) and ``mfdb<pid>r`` (receiver)
joined by a veth pair addressed ``10.231.0.1/24`` and ``10.231.0.2/24`` (only inside these
namespaces), with a ``tbf`` qdisc on both ends; leaving the ``with`` block deletes both
namespaces (and with them the veth pair). Needs root and iproute2 (``ip``, ``tc``).
``probe_rate`` measures the link with bare sockets (``multifd_core.session.auto.probe_*``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multifd_core.errors import MultiFDError

#: The checkout: the probe scripts import ``benchmarks`` from there.
REPO = Path(__file__).resolve().parents[1]
SEND_IP = "10.231.0.1"
RECV_IP = "10.231.0.2"
#: tbf burst per rate (bytes): enough for the kernel timer granularity and 64 KiB GSO frames.
BURST = {"1gbit": "1mb", "10gbit": "8mb"}

_SINK = r"""
import json, socket, sys
from benchmarks.bench_link import probe_receive
host, port, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(16)
print("ready", flush=True)
socks = [ls.accept()[0] for _ in range(conns)]
n, s = probe_receive(socks)
print(json.dumps({"bytes": n, "seconds": s}), flush=True)
"""

_PUSH = r"""
import socket, sys, time
from benchmarks.bench_link import probe_send
host, port, conns, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for _ in range(conns):
    for attempt in range(100):
        try:
            socks.append(socket.create_connection((host, port), timeout=10)); break
        except ConnectionRefusedError:
            time.sleep(0.05)
probe_send(socks, secs)
"""


def link_missing_reason() -> str | None:
    """Why namespaces with a tbf link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool}: apt-get install iproute2"
    return None


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


class Link:
    """Two namespaces joined by a veth pair, each end shaped by tbf at ``rate``."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        tag = f"{os.getpid() % 100000}"
        self.send_ns, self.recv_ns = f"mfdb{tag}s", f"mfdb{tag}r"
        self.send_dev, self.recv_dev = f"mfb{tag}s", f"mfb{tag}r"
        self.host = RECV_IP

    def __enter__(self) -> Link:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        _run("ip", "netns", "add", self.send_ns)
        _run("ip", "netns", "add", self.recv_ns)
        _run("ip", "link", "add", self.send_dev, "netns", self.send_ns, "type", "veth",
             "peer", "name", self.recv_dev, "netns", self.recv_ns)
        for ns, dev, ip in ((self.send_ns, self.send_dev, SEND_IP),
                            (self.recv_ns, self.recv_dev, RECV_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                 "burst", BURST.get(self.rate, "8mb"), "latency", "20ms")

    def close(self) -> None:
        for ns in (self.send_ns, self.recv_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def probe_rate(self, conns: int = 2, seconds: float = 2.0) -> dict[str, Any]:
        """Bare-socket throughput from the sender namespace to the receiver's."""
        from benchmarks.common import free_port

        port = str(free_port())
        sink = subprocess.Popen(["ip", "netns", "exec", self.recv_ns, sys.executable, "-c",
                                 _SINK, self.host, port, str(conns)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert sink.stdout is not None
            sink.stdout.readline()
            subprocess.run(["ip", "netns", "exec", self.send_ns, sys.executable, "-c", _PUSH,
                            self.host, port, str(conns), str(seconds)],
                           check=True, timeout=seconds + 60, cwd=REPO)
            out, _ = sink.communicate(timeout=60)
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait()
        got = json.loads(out.strip().splitlines()[-1])
        rate = got["bytes"] / got["seconds"] if got["seconds"] else 0.0
        return {"conns": conns, "bytes": got["bytes"], "seconds": round(got["seconds"], 4),
                "bytes_per_s": round(rate)}


# The bare-socket link probe: incompressible bytes pushed for ``seconds`` over N connections
# (``probe_send``), counted from the first to the last byte (``probe_receive``).

_PROBE_CHUNK = 256 * 1024


def probe_send(socks: Sequence[socket.socket], seconds: float) -> int:
    """Push random bytes on every socket for ``seconds``, then shut down writing; the bytes."""
    chunk = memoryview(os.urandom(_PROBE_CHUNK))
    sent = [0] * len(socks)
    deadline = time.monotonic() + seconds

    def push(i: int) -> None:
        while time.monotonic() < deadline:
            socks[i].sendall(chunk)
            sent[i] += len(chunk)
        socks[i].shutdown(socket.SHUT_WR)

    _run_threads(push, len(socks))
    return sum(sent)


def probe_receive(socks: Sequence[socket.socket]) -> tuple[int, float]:
    """Read every socket to EOF; (bytes, seconds from the first byte to the last)."""
    got = [0] * len(socks)
    first: list[float] = []
    last = [0.0]
    lock = threading.Lock()

    def pull(i: int) -> None:
        buf = bytearray(_PROBE_CHUNK)
        while n := socks[i].recv_into(buf):
            now = time.perf_counter()
            with lock:
                if not first:
                    first.append(now)
                last[0] = max(last[0], now)
            got[i] += n

    _run_threads(pull, len(socks))
    span = (last[0] - first[0]) if first else 0.0
    return sum(got), span


def _run_threads(target: Any, n: int) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise MultiFDError(f"link probe failed: {errors[0]}")
