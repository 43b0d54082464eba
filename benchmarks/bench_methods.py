"""zlib and zstd through the engine vs the bare codec, in one run (not a test).

    .venv/bin/python benchmarks/bench_methods.py [--size-mib 1024] [--json PATH]

For each method at level 1 and 1 and 2 channels, on the embedded mixed image: the engine's
time over loopback (``multifd recv`` in its own process <- our sender; the transfer time,
first packet to last SYNC), its wire bytes and ratio, and in the same run the bare codec
compressing the same packets (the image's normal pages, 128-page packets) with one
persistent stream per thread in as many threads as channels. Target: the engine reaches at
least 90% of the bare codec's throughput. Both endpoints share this machine's cores: the
receiver's decompression runs on the same cores as the sender's compression, which the bare
figure does not pay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_codecs import bare_codec_throughput  # noqa: E402

from multifd_core.demo import mixed_image_path, run_pair  # noqa: E402
from multifd_core.pages import zero_mask  # noqa: E402
from multifd_core.ram import RamBlock  # noqa: E402


def image_packets(block: RamBlock) -> list[np.ndarray]:
    """The normal pages of each 128-page packet, as the engine's channels see them."""
    out = []
    for first in range(0, block.n_pages, 128):
        rows = block.pages[first : first + 128]
        keep = ~zero_mask(block.words[first : first + 128])
        if keep.any():
            out.append(np.ascontiguousarray(rows[keep]).reshape(-1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--methods", nargs="*", default=["zlib", "zstd"])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    image = mixed_image_path(args.size_mib)
    block = RamBlock.from_file(image, "pc.ram")
    packets = image_packets(block)
    rows = []
    print(f"image {args.size_mib} MiB; engine transfer time vs bare codec, level 1, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'method':<6} {'ch':>2} {'engine s':>9} {'bare s':>8} {'engine/bare tput':>17} "
          f"{'wire MiB':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(image)) as tmp:
        for method in args.methods:
            for channels in (1, 2):
                run = run_pair(image, method, channels, os.path.join(tmp, f"{method}{channels}"),
                               level=1, timeout=600)
                assert run["verified"], f"{method}: output failed verification"
                bare = bare_codec_throughput(method, 1, channels, packets)
                share = bare["seconds"] / run["transfer_seconds"]
                row = {"method": method, "channels": channels,
                       "engine_transfer_s": run["transfer_seconds"],
                       "bare_codec_s": bare["seconds"], "engine_share_of_bare": share,
                       "wire_bytes": run["wire_bytes"], "ratio": run["compression_ratio"]}
                rows.append(row)
                print(f"{method:<6} {channels:>2} {run['transfer_seconds']:9.2f} "
                      f"{bare['seconds']:8.2f} {share:16.0%} "
                      f"{run['wire_bytes'] / 2**20:9.1f} {run['compression_ratio']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_mib": args.size_mib, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
