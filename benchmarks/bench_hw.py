"""Benchmark of the hardware-offload methods (qpl, uadk, qatzip) per engine, next to zstd.

A mixed image (40% zero, 30% text-like, 30% random pages, shuffled) is cut into packets of
its non-zero pages (zero pages never reach a method), which two threads encode, each on its
own channel, then decode. Reported per method and engine: encode and decode wall time and
throughput over the whole image, packets per second, the payload size over the non-zero pages
(ratio), and the share of time two busy channel threads were runnable (GIL: 1.0 = they never
waited for it; ``multifd_core.gilcheck.gil_runnable``).

The qpl and uadk software engines run twice in the same run: with their C helper
(multifd-pagecodec, one call a packet) and with the Python per-page loop it replaces
(``extra={"native": False}``); a summary compares the two.

    python -m benchmarks.bench_hw [--size-mib 256] [--threads 2] [--only qatzip,zstd]

libqatzip: set MULTIFD_QATZIP_LIBRARY, or run from this checkout with .cache/qatzip in place.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.engine.harness import MethodHarness
from multifd_core.gilcheck import gil_runnable
from multifd_core.methods.method import MethodOptions
from multifd_core.pagekinds import make_pages
from multifd_core.vendorbench import run_threads
from multifd_core.wire import page_count

PAGE = 4096
REPO = Path(__file__).resolve().parents[1]


def build_image(size_mib: int, seed: int = 7) -> np.ndarray:
    n = size_mib * (1 << 20) // PAGE
    rng = np.random.default_rng(seed)
    kinds = np.array(["zero"] * 4 + ["text"] * 3 + ["random"] * 3)[rng.integers(0, 10, n)]
    image = np.zeros((n, PAGE), dtype=np.uint8)
    for kind in ("text", "random"):
        idx = np.flatnonzero(kinds == kind)
        image[idx] = make_pages(kind, len(idx), PAGE, rng)
    return image


def packets_of(image: np.ndarray) -> list[np.ndarray]:
    normal = np.flatnonzero(image.reshape(len(image), -1).any(axis=1))
    step = page_count(PAGE)
    return [image[normal[i:i + step]] for i in range(0, len(normal), step)]


def use_checkout_libqatzip() -> None:
    """Point MULTIFD_QATZIP_LIBRARY at this checkout's .cache/qatzip unless it is set."""
    if not os.environ.get("MULTIFD_QATZIP_LIBRARY"):
        local = sorted(glob.glob(str(REPO / ".cache/qatzip/usr/lib/*/libqatzip.so.3")))
        if local:
            os.environ["MULTIFD_QATZIP_LIBRARY"] = local[0]


def bench_method(make: Callable[[], Any], packets: list[np.ndarray], threads: int
                 ) -> tuple[float, float, int]:
    """(encode seconds, decode seconds, payload bytes), packets split round-robin."""
    harnesses = [MethodHarness(make(), make()) for _ in range(threads)]
    payloads: list[list[bytes]] = [[] for _ in range(threads)]

    def encode(k: int) -> None:
        h = harnesses[k]
        payloads[k] = [h.encode(p) for p in packets[k::threads]]

    def decode(k: int) -> None:
        h = harnesses[k]
        for payload, pages in zip(payloads[k], packets[k::threads], strict=True):
            out = h.decode(payload, len(pages))
            if out[-1, -1] != pages[-1, -1]:
                raise AssertionError("decoded pages differ")

    t_enc = run_threads(threads, encode)
    t_dec = run_threads(threads, decode)
    for h in harnesses:
        h.close()
    return t_enc, t_dec, sum(len(p) for ps in payloads for p in ps)


def candidates(only: set[str] | None) -> list[tuple[str, str, Callable[[], Any]]]:
    """(method, engine label, factory) for every method and engine available here."""
    from multifd_core.methods.registry import MethodRegistry

    reg = MethodRegistry()
    out: list[tuple[str, str, Callable[[], Any]]] = []

    def add(name: str, label: str, **opts: Any) -> None:
        if name not in reg or (only and name not in only):
            return
        cls = reg.get(name).cls
        out.append((name, label, lambda: cls(MethodOptions(page_size=PAGE, **opts))))

    def both_paths(name: str, label: str, extra: dict[str, Any]) -> None:
        """The C helper's path (where built), then the Python per-page loop."""
        add(name, f"{label} native", engine="software", extra=extra)
        add(name, f"{label} Python loop", engine="software", extra={**extra, "native": False})

    for name in ("qpl", "uadk", "qatzip"):
        if name not in reg:
            continue
        for e in reg.get(name).cls.engines():
            if not e.available:
                continue
            if name == "qpl" and e.name == "software":
                for backend in ("isal", "zlib"):
                    if backend == "zlib" or e.library == "isal":
                        both_paths(name, f"software/{backend}", {"backend": backend})
            elif name == "uadk" and e.name == "software":
                add(name, "software (raw, as QEMU)", engine="software")
                both_paths(name, "software/zlib (opt-in)", {"software_compress": True})
            else:
                label = f"{e.name} ({e.kind})" if e.name != e.kind else e.name
                add(name, label, engine=e.name, level=1 if name == "qatzip" else None)
    if only is None or "zstd" in only:
        if "zstd" in reg:
            add("zstd", "multifd-zstd", level=1)
        else:
            out.append(("zstd", "zstandard (direct)", zstd_direct()))
    return out


def zstd_direct() -> Callable[[], Any]:
    """QEMU's zstd payload with the zstandard package (when multifd-zstd is not installed):
    one stream per channel, a block flush per packet. Benchmark use only."""
    import zstandard

    from multifd_core.methods.hookspecs import hookimpl
    from multifd_core.methods.method import Method

    class ZstdDirect(Method):
        name, code, description = "zstd", 0x04, "zstandard direct (benchmark only)"

        @hookimpl
        def send_setup(self, channel: Any) -> None:
            channel.state = zstandard.ZstdCompressor(level=1).compressobj()

        @hookimpl
        def send_prepare(self, channel: Any, packet: Any) -> list[Any]:
            c = channel.state
            return [c.compress(packet.data()), c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]

        @hookimpl
        def recv_setup(self, channel: Any) -> None:
            channel.state = zstandard.ZstdDecompressor().decompressobj()

        @hookimpl
        def recv(self, channel: Any, packet: Any) -> None:
            packet.write_pages(channel.state.decompress(packet.read_payload()))

    return lambda: ZstdDirect(MethodOptions(page_size=PAGE))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated methods (default: all)")
    args = ap.parse_args(argv)
    use_checkout_libqatzip()
    only = {m.strip() for m in args.only.split(",") if m.strip()} or None

    t = time.perf_counter()
    image = build_image(args.size_mib)
    packets = packets_of(image)
    normal_bytes = sum(p.nbytes for p in packets)
    print(f"image {args.size_mib} MiB: {len(image)} pages, {normal_bytes / image.nbytes:.0%} "
          f"non-zero in {len(packets)} packets; {args.threads} threads; built in "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    mib, count = image.nbytes / (1 << 20), len(packets)
    head = (f"{'method':<8} {'engine':<36} {'enc s':>6} {'enc MiB/s':>9} {'enc pkt/s':>9} "
            f"{'dec s':>6} {'dec MiB/s':>9} {'dec pkt/s':>9} {'ratio':>6} {'GIL run':>7}")
    print(head)
    print("-" * len(head))
    rows: dict[str, tuple[float, float, float]] = {}
    for name, label, make in candidates(only):
        t_enc, t_dec, size = bench_method(make, packets, args.threads)
        gil = gil_runnable(make, PAGE)
        rows[f"{name} {label}"] = (t_enc, t_dec, gil)
        print(f"{name:<8} {label:<36} {t_enc:>6.2f} {mib / t_enc:>9.0f} {count / t_enc:>9.0f} "
              f"{t_dec:>6.2f} {mib / t_dec:>9.0f} {count / t_dec:>9.0f} "
              f"{size / normal_bytes:>6.3f} {gil:>7.2f}", flush=True)
    print("ratio = payload bytes / non-zero page bytes; MiB/s over the whole image; GIL run = "
          "share of time two busy channel threads were runnable (1.0: never waiting for the GIL)")
    print_native_gain(rows)
    return 0


def print_native_gain(rows: dict[str, tuple[float, float, float]]) -> None:
    """Native against Python loop, for every engine measured both ways."""
    for key, (t_enc, t_dec, gil) in rows.items():
        base = key.removesuffix(" native")
        slow = rows.get(f"{base} Python loop")
        if base == key or slow is None:
            continue
        print(f"{base}: native helper vs Python per-page loop: encode x{slow[0] / t_enc:.2f}, "
              f"decode x{slow[1] / t_dec:.2f}; GIL runnable {gil:.2f} vs {slow[2]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
