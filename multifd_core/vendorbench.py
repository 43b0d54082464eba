"""The vendor benchmark: ``multifd bench --methods NAME --engines a,b``, from an installed wheel.

For each method and each of its engines available here: encode and decode MiB/s with 1 and 2
threads (each thread its own channel, packets of the mixed image's non-zero pages, round
robin), the GIL verdict (``multifd_core.gilcheck``), and for every engine pair (sender engine,
receiver engine) a native migration over loopback TCP checked byte for byte, with its wire
ratio. Everything here ships in the core package; the full suite (``benchmarks/``) needs a
source checkout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MultiFDError
from multifd_core.gilcheck import GilCheckUnavailable, gil_verdict
from multifd_core.image import fill_mixed
from multifd_core.methods.method import Method, MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.wire import page_count

__all__ = ["bench_codec", "bench_pair", "run", "run_threads"]


def image(size_mib: int, page_size: int) -> np.ndarray:
    """The mixed image (40% zero, 30% text-like, 30% random pages) as ``(n, page_size)``."""
    pages = np.zeros((size_mib * (1 << 20) // page_size, page_size), dtype=np.uint8)
    fill_mixed(pages)
    return pages


def packets_of(pages: np.ndarray) -> list[np.ndarray]:
    """Full packets of the non-zero pages (zero pages never reach a method)."""
    normal = np.flatnonzero(pages.any(axis=1))
    step = page_count(pages.shape[1])
    return [pages[normal[i:i + step]] for i in range(0, len(normal), step)]


def run_threads(count: int, work: Callable[[int], None]) -> float:
    """Run ``work(k)`` in ``count`` threads; the wall time; the first error is raised."""
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            work(k)
        except BaseException as exc:  # re-raised after the join
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def bench_codec(make: Callable[[], Method], packets: list[np.ndarray], threads: int
                ) -> dict[str, float]:
    """Encode then decode every packet, split round robin over ``threads`` channels; MiB/s are
    over the pages' bytes, ``ratio`` is payload bytes over page bytes."""
    harnesses = [MethodHarness(make(), make()) for _ in range(threads)]
    payloads: list[list[bytes]] = [[] for _ in range(threads)]
    try:
        def encode(k: int) -> None:
            payloads[k] = [harnesses[k].encode(p) for p in packets[k::threads]]

        def decode(k: int) -> None:
            for payload, pages in zip(payloads[k], packets[k::threads], strict=True):
                if not np.array_equal(harnesses[k].decode(payload, len(pages)), pages):
                    raise MultiFDError("decoded pages differ from the encoded ones")

        t_enc = run_threads(threads, encode)
        t_dec = run_threads(threads, decode)
    finally:
        for h in harnesses:
            h.close()
    mib = sum(p.nbytes for p in packets) / (1 << 20)
    wire = sum(len(p) for ps in payloads for p in ps)
    return {"threads": threads, "encode_mib_s": mib / t_enc, "decode_mib_s": mib / t_dec,
            "ratio": wire / (mib * (1 << 20))}


def bench_pair(method: str, sender: str, receiver: str, pages: np.ndarray, channels: int,
               level: int | None, registry: MethodRegistry) -> dict[str, Any]:
    """One loopback migration, ``sender`` engine to ``receiver`` engine, checked."""
    from multifd_core import loopback
    from multifd_core.engine.ram import RamBlock

    block = RamBlock.zeros("pc.ram", pages.nbytes, page_size=pages.shape[1])
    block.array[:] = pages.reshape(-1)
    start = time.perf_counter()
    dest, stats = loopback.migrate([block], method=method, channels=channels, level=level,
                                   engine=sender, receiver_engine=receiver, registry=registry,
                                   timeout=300)
    seconds = time.perf_counter() - start
    identical = bool(np.array_equal(dest[0].array, block.array))
    return {"sender": sender, "receiver": receiver, "identical": identical,
            "seconds": seconds, "ram_gb_s": pages.nbytes / seconds / 1e9,
            "wire_ratio": stats.wire_bytes / stats.ram_bytes}


def _engines(cls: type[Method], wanted: list[str] | None) -> list[str]:
    infos = {e.name: e for e in cls.engines()}
    names = wanted or [n for n, e in infos.items() if e.available]
    for n in names:
        if n not in infos:
            raise MultiFDError(f"method {cls.name} has no engine {n!r}; engines: "
                               f"{', '.join(infos)}")
        if not infos[n].available:
            raise MultiFDError(f"engine {n} of method {cls.name} is not available here: "
                               f"{infos[n].reason}")
    if not names:
        raise MultiFDError(f"method {cls.name} has no engine available here")
    return names


def bench_method(name: str, engines: list[str] | None, pages: np.ndarray,
                 args: argparse.Namespace, registry: MethodRegistry) -> dict[str, Any]:
    cls = registry.get(name).cls
    names = _engines(cls, engines)
    packets = packets_of(pages)
    page_size = pages.shape[1]
    out: dict[str, Any] = {"method": name, "engines": []}
    for engine in names:
        def make(e: str = engine) -> Method:
            return cls(MethodOptions(page_size=page_size, level=args.level, engine=e))

        row: dict[str, Any] = {"engine": engine, "codec": [
            bench_codec(make, packets, t) for t in args.threads]}
        try:
            row["gil"] = gil_verdict(make, page_size).as_dict()
        except GilCheckUnavailable as exc:
            row["gil"] = {"error": str(exc)}
        out["engines"].append(row)
        for c in row["codec"]:
            print(f"{name:<8} {engine:<14} {c['threads']:>7} {c['encode_mib_s']:>10.0f} "
                  f"{c['decode_mib_s']:>10.0f} {c['ratio']:>6.3f}", flush=True)
        gil = row["gil"]
        print(f"{name:<8} {engine:<14} GIL: " + (gil["error"] if "error" in gil else
              f"{'released' if gil['releases'] else 'HELD'} (parallel in {gil['votes']} of "
              f"{gil['windows']} windows, runnable {gil['runnable_median']:.2f}, "
              f"concurrency {gil['concurrency_median']:.2f} CPUs)"), flush=True)
    out["pairs"] = []
    for sender, receiver in itertools.product(names, repeat=2):
        pair = bench_pair(name, sender, receiver, pages, args.channels, args.level, registry)
        out["pairs"].append(pair)
        print(f"{name:<8} migrate {sender} -> {receiver}: {pair['seconds']:.2f} s, "
              f"{pair['ram_gb_s']:.2f} GB/s, wire ratio {pair['wire_ratio']:.3f}, "
              f"{'identical' if pair['identical'] else 'DIFFERS'}", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    """The vendor benchmark for ``args.methods`` (default: every available method)."""
    registry = default_registry()
    methods = args.methods or [e.name for e in registry.entries() if e.cls.available()[0]]
    for m in methods:
        if m not in registry:
            raise MultiFDError(f"unknown method {m!r}; installed: "
                               f"{', '.join(e.name for e in registry.entries())}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()] if args.engines else None
    if engines and len(methods) != 1:
        raise MultiFDError("--engines names the engines of one method: give exactly one "
                           "--methods NAME")
    size = args.size_mib or 64
    pages = image(size, args.page_size)
    print(f"vendor benchmark: {size} MiB mixed image ({len(packets_of(pages))} packets of "
          f"non-zero pages), {args.channels} channels per migration, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    print(f"{'method':<8} {'engine':<14} {'threads':>7} {'enc MiB/s':>10} {'dec MiB/s':>10} "
          f"{'ratio':>6}")
    started = time.perf_counter()
    results = [bench_method(m, engines, pages, args, registry) for m in methods]
    report = {"version": 1, "kind": "vendor", "size_mib": size, "page_size": args.page_size,
              "channels": args.channels, "threads": args.threads, "level": args.level,
              "loadavg": list(os.getloadavg()), "cpus": os.cpu_count(),
              "seconds": time.perf_counter() - started, "methods": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = [p for r in results for p in r["pairs"] if not p["identical"]]
    return 1 if bad else 0
