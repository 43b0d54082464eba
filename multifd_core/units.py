"""Sizes on the command line."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    """``1024``, ``64M``, ``1G``, ``1T`` (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 512M, 64G, 1T"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value
