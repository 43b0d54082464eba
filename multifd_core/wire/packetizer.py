"""Cutting a batch of pages into packets, vectorised over the whole batch (sans-IO).

A channel thread takes a batch of up to a few packets' worth of page numbers of one block,
and ``plan_batch`` computes for all of them at once: the zero-page split, the big-endian
offsets of every packet, and zero-copy views of each packet's runs of adjacent normal pages.
Per packet, what is left is slicing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from multifd_core.wire.pages import run_bounds as runs_of
from multifd_core.wire.pages import zero_mask

_EMPTY = np.zeros(0, dtype=np.int64)
_BE = np.dtype(">u8")


@dataclass
class BatchPlan:
    normal: np.ndarray  # page numbers of the normal pages, in batch order
    zero: np.ndarray
    normal_be: memoryview  # byte offsets, big-endian, 8 bytes each
    zero_be: memoryview
    normal_bounds: list[int]  # packet p has normal[normal_bounds[p]:normal_bounds[p + 1]]
    zero_bounds: list[int]
    run_bounds: list[int]  # packet p has runs[run_bounds[p]:run_bounds[p + 1]]
    runs: list[memoryview]

    @property
    def packets(self) -> int:
        return len(self.normal_bounds) - 1


def in_ranges(index: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """True for each page of ``index`` inside one of the sorted, disjoint ranges
    ``[starts[i], ends[i])``."""
    j = np.searchsorted(starts, index, side="right") - 1
    return (j >= 0) & (index < ends[np.maximum(j, 0)])


def scan_zero(words: np.ndarray, index: np.ndarray, first: int, n: int, contiguous: bool,
              holes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``zero_mask`` of pages ``index`` (``contiguous``: exactly ``first .. first + n - 1``),
    where pages inside ``holes`` are zero without being read. A loop per hole, not per page."""
    if holes is None or not len(holes[0]):
        return zero_mask(words[first : first + n] if contiguous else words[index])
    starts, ends = holes
    if not contiguous:
        out = in_ranges(index, starts, ends)
        rest = np.flatnonzero(~out)
        if len(rest):
            out[rest] = zero_mask(words[index[rest]])
        return out
    out = np.ones(n, dtype=bool)
    stop = first + n
    i = int(np.searchsorted(ends, first, side="right"))  # the first hole ending after first
    pos = first
    while pos < stop:
        if i < len(starts) and starts[i] <= pos:  # pos lies in hole i
            pos = int(ends[i])
            i += 1
            continue
        end = min(int(starts[i]), stop) if i < len(starts) else stop
        out[pos - first : end - first] = zero_mask(words[pos:end])
        pos = end
    return out


def plan_batch(block: np.ndarray, words: np.ndarray, index: np.ndarray, page_size: int,
               per_packet: int, detect_zero: bool = True,
               holes: tuple[np.ndarray, np.ndarray] | None = None) -> BatchPlan:
    """Plan the packets for pages ``index`` of ``block`` (flat uint8; ``words`` its
    ``(n_pages, page_size // 8)`` uint64 view). ``holes``: ``(starts, ends)`` page ranges
    known to read as zeros, taken as zero pages without being read."""
    n = len(index)
    n_packets = -(-n // per_packet)
    first = int(index[0])
    contiguous = int(index[-1]) - first + 1 == n
    if detect_zero:
        zmask = scan_zero(words, index, first, n, contiguous, holes)
    else:
        zmask = np.zeros(n, dtype=bool)
    packet_of = np.arange(n) // per_packet
    if zmask.any():
        keep = ~zmask
        normal, zero = index[keep], index[zmask]
        normal_packet, zero_packet = packet_of[keep], packet_of[zmask]
    else:
        normal, zero = index, _EMPTY
        normal_packet, zero_packet = packet_of, _EMPTY
    edges = np.arange(n_packets + 1)
    normal_bounds = np.searchsorted(normal_packet, edges).tolist()
    zero_bounds = np.searchsorted(zero_packet, edges).tolist()
    # Runs: consecutive page numbers within one packet.
    if len(normal):
        starts, ends = runs_of(normal, np.diff(normal_packet) != 0)
        lo = (normal[starts] * page_size).tolist()
        hi = ((normal[ends - 1] + 1) * page_size).tolist()
        mv = memoryview(block).cast("B")
        runs = [mv[a:b] for a, b in zip(lo, hi, strict=True)]
        run_bounds = np.searchsorted(starts, normal_bounds).tolist()
    else:
        runs, run_bounds = [], [0] * (n_packets + 1)
    ps = np.uint64(page_size)
    normal_be = memoryview((normal.astype(np.uint64) * ps).astype(_BE)).cast("B")
    zero_be = memoryview((zero.astype(np.uint64) * ps).astype(_BE)).cast("B")
    return BatchPlan(normal, zero, normal_be, zero_be, normal_bounds, zero_bounds, run_bounds,
                     runs)
