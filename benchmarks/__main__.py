"""``python -m benchmarks [options]``: the suite, with ``multifd bench``'s options."""

from __future__ import annotations

import sys

from multifd_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
