"""The main job: migrate the embedded mixed image with every installed method and verify it.

The receiver runs as a separate ``multifd recv`` process (its own interpreter, as in real
use); the sender runs here. Each run's output is checked against the source's digest.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from multifd_core.engine.digest import manifest_digest
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError
from multifd_core.image import write_mixed_image
from multifd_core.methods.registry import default_registry
from multifd_core.session import send_session
from multifd_core.session.transport import Address


def cache_dir() -> str:
    root = os.environ.get("MULTIFD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multifd")
    os.makedirs(root, exist_ok=True)
    return root


def mixed_image_path(size_mib: int, seed: int = 42) -> str:
    """The cached mixed image of ``size_mib`` MiB (generated once)."""
    path = os.path.join(cache_dir(), f"mixed-{size_mib}MiB-seed{seed}.img")
    if not os.path.exists(path):
        tmp = path + ".partial"
        write_mixed_image(tmp, size_mib << 20, seed=seed)
        os.replace(tmp, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(image: str, method: str, channels: int, out_dir: str, *,
             level: int | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """One migration: ``multifd recv`` subprocess <- this process's sender."""
    port = _free_port()
    addr = f"tcp:127.0.0.1:{port}"
    recv = subprocess.Popen(
        [sys.executable, "-m", "multifd_core.cli", "recv", "--listen", addr, "--out", out_dir,
         "--compression", method, "--json", "--timeout", str(timeout),
         "--wait-first", str(timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        block = RamBlock.from_file(image, "pc.ram")
        started = time.perf_counter()
        stats = send_session([block], Address("tcp", "127.0.0.1", port), method=method,
                             channels=channels, level=level, timeout=timeout)
        elapsed = time.perf_counter() - started
        out, err = recv.communicate(timeout=timeout)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    if recv.returncode != 0:
        raise MultiFDError(f"receiver failed ({recv.returncode}): {err.strip()}")
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    verified = manifest_digest(manifest["blocks"][0])[1] == stats.digests["pc.ram"]
    row = stats.as_dict()
    row.update(elapsed=elapsed, verified=verified, receiver=json.loads(out))
    return row


def engine_text(side: dict[str, Any] | None) -> str:
    """``software: isal, native``: the engine, its library and path, for a table cell."""
    if not side:
        return "?"
    lib = side.get("library") or ""
    kind = " (hardware)" if side.get("kind") == "hardware" else ""
    return (f"{side['engine']}{kind}{': ' + os.path.basename(lib) if lib else ''}, "
            f"{side.get('path') or 'path not stated'}")


def engines_text(row: dict[str, Any]) -> str:
    """Both sides' engines, once when they are the same."""
    engines = row.get("engines") or {}
    a, b = engine_text(engines.get("sender")), engine_text(engines.get("receiver"))
    return a if a == b else f"{a} | {b}"


def run_demo(*, size_mib: int = 1024, channels: int = 4, methods: list[str] | None = None,
             workdir: str | None = None, as_json: bool = False) -> int:
    registry = default_registry()
    names = methods or [e.name for e in registry.entries() if e.cls.available()[0]]
    for n in names:
        registry.get(n)
    t0 = time.perf_counter()
    image = mixed_image_path(size_mib)
    gen = time.perf_counter() - t0
    if not as_json:
        print(f"image: {image} ({size_mib} MiB, 40% zero / 30% text / 30% random; "
              f"ready in {gen:.1f} s); {channels} channels over loopback TCP")
        print(f"{'method':<8} {'seconds':>8} {'GB/s':>6} {'wire MiB':>9} {'ratio':>6} "
              f"{'zero pages':>10} {'verified':>8}  engine (sender | receiver)")
    rows = []
    base = workdir or tempfile.mkdtemp(prefix="multifd-demo-", dir=cache_dir())
    failed = False
    try:
        for name in names:
            out_dir = os.path.join(base, name)
            try:
                row = run_pair(image, name, channels, out_dir)
            except MultiFDError as exc:
                failed = True
                rows.append({"method": name, "error": str(exc)})
                if not as_json:
                    print(f"{name:<8} FAILED: {exc}")
                continue
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
            rows.append(row)
            failed |= not row["verified"]
            if not as_json:
                print(f"{name:<8} {row['transfer_seconds']:8.3f} "
                      f"{row['throughput_bytes_per_s'] / 1e9:6.2f} "
                      f"{row['wire_bytes'] / 2**20:9.1f} {row['compression_ratio']:6.2f} "
                      f"{row['zero_pages']:>10} {'yes' if row['verified'] else 'NO':>8}  "
                      f"{engines_text(row)}")
    finally:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    if as_json:
        print(json.dumps({"image_mib": size_mib, "channels": channels, "runs": rows}))
    return 1 if failed else 0
