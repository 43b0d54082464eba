"""``multifd bench``: the performance suite (physical limits, every method and engine, memory,
rate-limited links with ``auto``'s choice, QEMU rows), as a table, JSON and PNG charts; or the
vendor benchmark of a method's engines (``--engines``, ``--vendor``).

The suite is the source checkout's ``benchmarks`` package (``python -m benchmarks`` runs it
too), which this command loads by its path. The vendor benchmark (``multifd_core.vendorbench``)
ships in the package: from an installed wheel, without a checkout, ``multifd bench`` runs it and
says so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from multifd_core.errors import MultiFDError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_suite() -> ModuleType:
    """``benchmarks.bench_suite`` of this checkout: the ``benchmarks`` package is loaded by its
    path (registered in ``sys.modules``; ``sys.path`` is left alone)."""
    if not (BENCHMARKS / "bench_suite.py").is_file():
        raise MultiFDError(f"multifd bench needs the source checkout's benchmarks/ directory "
                           f"(not found at {BENCHMARKS}); install multifd-core editable from "
                           "a clone: pip install -e .")
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", BENCHMARKS / "__init__.py", submodule_search_locations=[str(BENCHMARKS)])
        assert spec is not None and spec.loader is not None
        package = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("benchmarks.bench_suite")


#: Options that only the full suite reads (flag, argparse destination).
SUITE_ONLY = (("--quick", "quick"), ("--charts", "charts"), ("--sections", "sections"),
              ("--no-link", "no_link"), ("--no-rss", "no_rss"), ("--qemu", "qemu"),
              ("--workdir", "workdir"))


def cmd_bench(args: argparse.Namespace) -> int:
    vendor = args.vendor or args.engines is not None
    if not vendor and not (BENCHMARKS / "bench_suite.py").is_file():
        used = [flag for flag, dest in SUITE_ONLY if getattr(args, dest)]
        if used:
            raise MultiFDError(f"{', '.join(used)}: the full suite needs the source "
                               f"checkout's benchmarks/ (not found at {BENCHMARKS}); without "
                               f"it multifd bench runs the vendor benchmark only")
        print("multifd bench: no source checkout (benchmarks/ not found): running the vendor "
              "benchmark only", file=sys.stderr, flush=True)
        vendor = True
    if vendor:
        from multifd_core import vendorbench

        channels = args.channels[0] if args.channels else 2
        return vendorbench.run(argparse.Namespace(**{**vars(args), "channels": channels}))
    return int(load_suite().run(args))


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = sub.add_parser("bench", help="the performance suite on the embedded mixed image",
                       description=__doc__)
    b.add_argument("--size-mib", type=int, default=None,
                   help="image size (default 1024; 16 with --quick)")
    b.add_argument("--quick", action="store_true",
                   help="smoke mode: a small image, none + one compressing method, 1 link")
    b.add_argument("--json", metavar="PATH", help="write the raw results as JSON")
    b.add_argument("--charts", metavar="DIR", help="draw PNG charts (needs matplotlib)")
    b.add_argument("--methods", nargs="+", default=None,
                   help="methods of the matrix (default: every installed, available one)")
    b.add_argument("--channels", nargs="+", type=int, default=None,
                   help="channel counts of the matrix (default 1 2 4)")
    b.add_argument("--slow-size-mib", type=int, default=256,
                   help="image size for slow methods (zlib above level 1, qatzip)")
    b.add_argument("--link-size-mib", type=int, default=512,
                   help="image size on the rate-limited links")
    b.add_argument("--sections", nargs="+", choices=("wall", "matrix", "rss", "links", "qemu"),
                   default=None, help="run only these parts (the physical limits always run)")
    b.add_argument("--no-link", action="store_true", help="skip the namespace/tbf links")
    b.add_argument("--no-rss", action="store_true", help="skip the RSS-vs-image-size runs")
    b.add_argument("--qemu", action="store_true",
                   help="add the QEMU rows: QEMU->QEMU beside our capture, replay and "
                        "native send of the same guest RAM (needs QEMU 10)")
    b.add_argument("--qemu-repeat", type=int, default=3,
                   help="interleaved trials per QEMU cell (medians; --quick: 1)")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds per migration")
    b.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir "
                                                   "next to the image cache)")
    v = b.add_argument_group("vendor benchmark (in the package: works from a wheel)")
    v.add_argument("--vendor", action="store_true",
                   help="run the vendor benchmark even in a source checkout")
    v.add_argument("--engines", metavar="A,B", default=None,
                   help="engines of the one --methods NAME (default: every available one); "
                        "implies --vendor")
    v.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                   help="thread counts of the encode/decode rows (default 1 2)")
    v.add_argument("--level", type=int, default=None, help="the method's level")
    v.add_argument("--page-size", type=int, default=4096)
    b.set_defaults(func=cmd_bench)
