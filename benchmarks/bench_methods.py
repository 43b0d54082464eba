"""zlib and zstd through the engine vs the bare codec, in one run (not a test).

    .venv/bin/python -m benchmarks.bench_methods [--size-mib 1024] [--repeat N] [--json PATH]

For each method at level 1 and 1 and 2 channels, on the embedded mixed image: the engine's
time over loopback (``multifd recv`` in its own process <- our sender; the transfer time,
first packet to last SYNC), its wire bytes and ratio, and in the same run the bare codec
compressing the same packets (the image's normal pages, 128-page packets) with one
persistent stream per thread in as many threads as channels. Target: the engine reaches at
least 90% of the bare codec's throughput (``engine/bare``).

Both endpoints share this machine's cores: the receiver's decompression runs on the same
cores as the sender's compression, which the bare figure does not pay. So the run also times
the bare codec decompressing the same payloads in as many threads, and prints the time the
two endpoints' codec work alone needs here, ``bound`` = max(bare compress, bare decompress,
(compress + decompress CPU seconds) / CPUs), and ``engine/bound``: the share of what any
engine could reach on this machine. With ``--repeat N`` every figure is the best of N runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from benchmarks.bench_codecs import bare_codec_throughput
from multifd_core.demo import mixed_image_path, run_pair
from multifd_core.engine.ram import RamBlock
from multifd_core.wire.pages import zero_mask


def image_packets(block: RamBlock) -> list[np.ndarray]:
    """The normal pages of each 128-page packet, as the engine's channels see them."""
    out = []
    for first in range(0, block.n_pages, 128):
        rows = block.pages[first : first + 128]
        keep = ~zero_mask(block.words[first : first + 128])
        if keep.any():
            out.append(np.ascontiguousarray(rows[keep]).reshape(-1))
    return out


def engine_run(image: str, method: str, channels: int, tmp: str) -> dict:
    """One verified migration of ``image``; its output is removed at once."""
    out = tempfile.mkdtemp(dir=tmp)
    try:
        run = run_pair(image, method, channels, out, level=1, timeout=600)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert run["verified"], f"{method}: output failed verification"
    return run


def codec_bound(compress: dict, decompress: dict, cpus: int) -> float:
    """Seconds the two endpoints' codec work alone needs on ``cpus`` CPUs (no engine)."""
    cpu = (compress["seconds"] * compress["cpu_per_wall"]
           + decompress["seconds"] * decompress["cpu_per_wall"])
    return max(compress["seconds"], decompress["seconds"], cpu / cpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--methods", nargs="*", default=["zlib", "zstd"])
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each figure")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    image = mixed_image_path(args.size_mib)
    block = RamBlock.from_file(image, "pc.ram")
    packets = image_packets(block)
    cpus = os.cpu_count() or 1
    rows = []
    load_start = os.getloadavg()[0]
    print(f"image {args.size_mib} MiB; engine transfer time vs bare codec, level 1, "
          f"{cpus} CPUs, best of {args.repeat}, load {load_start:.1f}")
    print(f"{'method':<6} {'ch':>2} {'engine s':>9} {'bare s':>7} {'engine/bare':>11} "
          f"{'bare dec s':>10} {'bound s':>7} {'engine/bound':>12} {'wire MiB':>9} "
          f"{'ratio':>6}")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(image)) as tmp:
        for method in args.methods:
            for channels in (1, 2):
                run = min((engine_run(image, method, channels, tmp)
                           for _ in range(args.repeat)), key=lambda r: r["transfer_seconds"])
                engine = run["transfer_seconds"]
                bare = bare_codec_throughput(method, 1, channels, packets, repeat=args.repeat)
                dec = bare_codec_throughput(method, 1, channels, packets, decode=True,
                                            repeat=args.repeat)
                bound = codec_bound(bare, dec, cpus)
                row = {"method": method, "channels": channels, "engine_transfer_s": engine,
                       "bare_codec_s": bare["seconds"],
                       "engine_share_of_bare": bare["seconds"] / engine,
                       "bare_decompress_s": dec["seconds"],
                       "bare_cpu_per_wall": bare["cpu_per_wall"],
                       "bare_decompress_cpu_per_wall": dec["cpu_per_wall"],
                       "codec_bound_s": bound, "engine_share_of_bound": bound / engine,
                       "wire_bytes": run["wire_bytes"], "ratio": run["compression_ratio"]}
                rows.append(row)
                print(f"{method:<6} {channels:>2} {engine:9.2f} {bare['seconds']:7.2f} "
                      f"{row['engine_share_of_bare']:11.0%} {dec['seconds']:10.2f} "
                      f"{bound:7.2f} {row['engine_share_of_bound']:12.0%} "
                      f"{run['wire_bytes'] / 2**20:9.1f} {run['compression_ratio']:6.2f}")
    load_end = os.getloadavg()[0]
    print(f"load {load_start:.1f} at the start, {load_end:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_mib": args.size_mib, "cpus": cpus, "repeat": args.repeat,
                       "load_start": load_start, "load_end": load_end, "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
