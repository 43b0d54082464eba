"""Bare-codec baseline for the zlib and zstd methods (a script, not a test).

Builds a mixed guest-like image in memory (about 40% zero pages, 30% text-like, 30% random),
cuts it into multifd packets (128 pages, zero pages dropped as QEMU's multifd zero-page
detection does, normal pages gathered into one buffer), and times the codec calls the
plugins make, one persistent stream per channel and one thread per channel:

    zlib  compress(packet) + flush(Z_SYNC_FLUSH)        decompress(payload, expected + 1)
    zstd  compress(packet) + flush(FLUSH_BLOCK)          stream_writer(sink).write(payload)

Usage::

    python -m benchmarks.bench_codecs [--size-mib 256] [--level 1] [--threads 1,2]
                                      [--methods zlib,zstd] [--json PATH]

``bare_codec_throughput(method, level, threads, packets)`` is the reusable measurement: the
engine's throughput can be compared with it on the same packets (``build_packets``).
Throughput is in MB/s (10**6 bytes) of normal-page input (``mb_per_s``) and of RAM covered
(``ram_mb_per_s``, which counts the zero pages the packets skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PAGE = 4096
PAGES_PER_PACKET = 128
KIND_SHARES = {"zero": 0.4, "text": 0.3, "random": 0.3}


# ---------------------------------------------------------------------- the image

def _corpus(size: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    words = [letters[rng.integers(0, 26, int(k))].tobytes() for k in rng.integers(2, 11, 5000)]
    picks = rng.integers(0, len(words), size // 5 + 16).tolist()
    text = b" ".join(words[i] for i in picks)
    return np.frombuffer(text[:size], dtype=np.uint8)


def build_image(size_mib: int = 256, seed: int = 1) -> np.ndarray:
    """A ``(pages, PAGE)`` uint8 image of zero, text-like and random pages in runs of 1..16."""
    rng = np.random.default_rng(seed)
    n = size_mib * (1 << 20) // PAGE
    runs = rng.integers(1, 17, n)
    kinds = rng.choice(3, size=n, p=list(KIND_SHARES.values()))
    per_page = np.repeat(kinds, runs)[:n]
    image = np.zeros((n, PAGE), dtype=np.uint8)
    text_idx = np.flatnonzero(per_page == 1)
    rand_idx = np.flatnonzero(per_page == 2)
    corpus = _corpus(16 << 20, rng)
    starts = rng.integers(0, len(corpus) - PAGE, len(text_idx))
    for lo in range(0, len(text_idx), 4096):  # bounded temporaries
        sel = starts[lo : lo + 4096]
        image[text_idx[lo : lo + 4096]] = corpus[sel[:, None] + np.arange(PAGE)]
    for lo in range(0, len(rand_idx), 4096):
        part = rand_idx[lo : lo + 4096]
        image[part] = np.frombuffer(rng.bytes(len(part) * PAGE), dtype=np.uint8).reshape(-1, PAGE)
    return image


def build_packets(image: np.ndarray) -> list[np.ndarray]:
    """The multifd packets of ``image``: per 128 pages, its normal pages in one buffer."""
    words = image.view(np.uint64)
    normal = np.bitwise_or.reduce(words, axis=1) != 0
    packets = []
    for lo in range(0, len(image), PAGES_PER_PACKET):
        idx = lo + np.flatnonzero(normal[lo : lo + PAGES_PER_PACKET])
        if len(idx):
            packets.append(np.ascontiguousarray(image[idx]).reshape(-1))
    return packets


# ---------------------------------------------------------------------- codecs

def _zlib_compressor(level: int) -> Callable[[Any], bytes]:
    stream = zlib.compressobj(level, zlib.DEFLATED, 15, 8)
    return lambda data: stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)


def _zlib_decompressor() -> Callable[[bytes, int], int]:
    stream = zlib.decompressobj(15)

    def decode(payload: bytes, expected: int) -> int:
        return len(stream.decompress(payload, expected + 1))

    return decode


def _zstd_compressor(level: int) -> Callable[[Any], bytes]:
    import zstandard

    stream = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                      write_content_size=False).compressobj()
    flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
    return lambda data: stream.compress(data) + stream.flush(flush)


class _Sink:
    size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def _zstd_decompressor() -> Callable[[bytes, int], int]:
    import zstandard

    sink = _Sink()
    stream = zstandard.ZstdDecompressor(max_window_size=1 << 25).stream_writer(
        sink, write_size=PAGES_PER_PACKET * PAGE + 1)

    def decode(payload: bytes, expected: int) -> int:
        before = sink.size
        stream.write(payload)
        return sink.size - before

    return decode


COMPRESSORS = {"zlib": _zlib_compressor, "zstd": _zstd_compressor}
DECOMPRESSORS = {"zlib": _zlib_decompressor, "zstd": _zstd_decompressor}


# ---------------------------------------------------------------------- measuring

def _run_threads(work: Sequence[Callable[[], None]]) -> tuple[float, float]:
    """Run each callable in its own thread, started together: (wall seconds, CPU seconds).

    CPU / wall above 1 proves the threads ran at the same time (the GIL was released);
    other load on the machine lowers both the throughput and this ratio, never raises it.
    """
    barrier = threading.Barrier(len(work) + 1)
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in work]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if errors:
        raise errors[0]
    return elapsed, cpu


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds during which a call of ``a`` and a call of ``b`` were both in progress.

    A codec call that holds the GIL cannot overlap another thread's call (the other thread
    cannot even read the clock), so any overlap proves the GIL was released, however busy
    the machine is.
    """
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def bare_codec_throughput(method: str, level: int, threads: int,
                          packets: Sequence[np.ndarray], *, decode: bool = False,
                          ram_bytes: int | None = None, repeat: int = 1) -> dict[str, Any]:
    """Time ``method``'s codec on ``packets`` with ``threads`` channels, one thread each.

    Packet ``i`` goes to channel ``i % threads``; each channel has one persistent stream,
    one compress call and one flush per packet (or, with ``decode``, one bounded decompress
    call per payload; the payloads are made beforehand and not timed). The best of
    ``repeat`` runs (fresh streams each time) is reported.
    """
    if method not in COMPRESSORS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(COMPRESSORS)}")
    if threads < 1:
        raise ValueError("threads must be >= 1")
    lanes = [list(packets[ch::threads]) for ch in range(threads)]
    calls: list[list[tuple[float, float]]] = [[] for _ in range(threads)]
    clock = time.perf_counter
    in_bytes = sum(p.nbytes for p in packets)
    out_sizes = [0] * threads
    if not decode:
        def lane_work(ch: int) -> Callable[[], None]:
            def work() -> None:
                compress = COMPRESSORS[method](level)
                spans = calls[ch] = []
                total = 0
                for p in lanes[ch]:
                    start = clock()
                    total += len(compress(p))
                    spans.append((start, clock()))
                out_sizes[ch] = total
            return work
    else:
        payloads = []
        for ch in range(threads):
            compress = COMPRESSORS[method](level)
            payloads.append([(compress(p), p.nbytes) for p in lanes[ch]])
            out_sizes[ch] = sum(len(c) for c, _ in payloads[ch])

        def lane_work(ch: int) -> Callable[[], None]:
            def work() -> None:
                decompress = DECOMPRESSORS[method]()
                spans = calls[ch] = []
                for payload, expected in payloads[ch]:
                    start = clock()
                    size = decompress(payload, expected)
                    spans.append((start, clock()))
                    if size != expected:
                        raise RuntimeError(f"{method}: payload decoded to a wrong size")
            return work
    best = (float("inf"), 0.0, 0.0)
    for _ in range(max(1, repeat)):
        seconds, cpu = _run_threads([lane_work(ch) for ch in range(threads)])
        overlap = _overlap(calls[0], calls[1]) / seconds if threads > 1 else 0.0
        best = min(best, (seconds, cpu, overlap))
    seconds, cpu, overlap = best
    out_bytes = sum(out_sizes)
    ram = in_bytes if ram_bytes is None else ram_bytes
    return {
        "method": method, "level": level, "threads": threads,
        "direction": "decompress" if decode else "compress",
        "packets": len(packets), "input_bytes": in_bytes, "output_bytes": out_bytes,
        "ram_bytes": ram, "seconds": round(seconds, 4),
        "cpu_per_wall": round(cpu / seconds, 2),
        "call_overlap": round(overlap, 3),
        "mb_per_s": round(in_bytes / seconds / 1e6, 1),
        "ram_mb_per_s": round(ram / seconds / 1e6, 1),
        "ratio": round(in_bytes / out_bytes, 3) if out_bytes else 0.0,
        "ram_ratio": round(ram / out_bytes, 3) if out_bytes else 0.0,
    }


def gil_release_note(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method and direction: 2-thread speed-up over 1 thread."""
    notes = []
    by_key = {(r["method"], r["direction"], r["threads"]): r for r in rows}
    for (method, direction, threads), row in by_key.items():
        one = by_key.get((method, direction, 1))
        if threads == 2 and one:
            speedup = row["mb_per_s"] / one["mb_per_s"]
            overlap = row["call_overlap"]
            verdict = ("releases the GIL" if overlap > 0.1 else
                       "calls never overlapped: the codec holds the GIL")
            scaling = ("scales" if speedup > 1.5 else
                       "does not scale here: is the machine busy? see cpu/wall")
            notes.append(f"{method} {direction}: 2 threads = {speedup:.2f}x 1 thread ({scaling});"
                         f" calls overlapped {overlap:.0%} of the time: {verdict}")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--level", type=int, default=1, help="compression level (default 1)")
    parser.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("--methods", default="zlib,zstd", help="methods (default zlib,zstd)")
    parser.add_argument("--no-decompress", action="store_true", help="time compression only")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    image = build_image(args.size_mib, args.seed)
    packets = build_packets(image)
    normal = sum(p.nbytes for p in packets) // PAGE
    print(f"image: {args.size_mib} MiB, {len(image)} pages, {normal} normal "
          f"({normal / len(image):.0%}), {len(packets)} packets; built in "
          f"{time.perf_counter() - t0:.1f}s")
    rows = []
    header = (f"{'method':6} {'dir':10} {'lvl':>3} {'thr':>3} {'MB/s in':>9} {'MB/s RAM':>9} "
              f"{'ratio':>6} {'seconds':>8} {'cpu/wall':>8} {'overlap':>7}")
    print(header)
    print("-" * len(header))
    directions = [False] if args.no_decompress else [False, True]
    for method in args.methods.split(","):
        for decode in directions:
            for threads in (int(t) for t in args.threads.split(",")):
                row = bare_codec_throughput(method, args.level, threads, packets,
                                            decode=decode, ram_bytes=image.nbytes,
                                            repeat=args.repeat)
                rows.append(row)
                print(f"{method:6} {row['direction']:10} {args.level:>3} {threads:>3} "
                      f"{row['mb_per_s']:>9.1f} {row['ram_mb_per_s']:>9.1f} "
                      f"{row['ratio']:>6.2f} {row['seconds']:>8.3f} "
                      f"{row['cpu_per_wall']:>8.2f} {row['call_overlap']:>7.2f}")
    for line in gil_release_note(rows):
        print(line)
    if args.json:
        meta = {"size_mib": args.size_mib, "pages": len(image), "normal_pages": normal,
                "packets": len(packets), "page_size": PAGE, "seed": args.seed,
                "repeat": args.repeat, "cpus": os.cpu_count(),
                "loadavg_at_end": os.getloadavg(), "zlib_version": zlib.ZLIB_RUNTIME_VERSION}
        try:
            import zstandard

            meta["zstd_version"] = ".".join(map(str, zstandard.ZSTD_VERSION))
            meta["zstandard_backend"] = zstandard.backend
        except ImportError:
            pass
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
