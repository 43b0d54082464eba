"""Vectorised page work: zero-page detection and runs of adjacent pages (no per-page loop)."""

from __future__ import annotations

import numpy as np

#: Rows scanned per step: 512 KiB of 4 KiB pages, so the gathered candidates stay in cache.
SCAN_BYTES = 512 * 1024


def zero_mask(pages_u64: np.ndarray) -> np.ndarray:
    """True for each all-zero row of a ``(n, page_size // 8)`` uint64 array.

    A page whose first word is non-zero is non-zero; only the others are reduced in full,
    so data pages cost one load each and zero pages one OR-reduction. Large inputs are scanned
    in cache-sized steps (a loop per 512 KiB, not per page).
    """
    step = max(1, SCAN_BYTES // (pages_u64.shape[1] * 8))
    if len(pages_u64) <= step:
        return _zero_mask(pages_u64)
    return np.concatenate([_zero_mask(pages_u64[i : i + step])
                           for i in range(0, len(pages_u64), step)])


def _zero_mask(pages_u64: np.ndarray) -> np.ndarray:
    first_zero = pages_u64[:, 0] == 0
    candidates = np.flatnonzero(first_zero)
    if len(candidates) == 0:
        return first_zero
    if 4 * len(candidates) >= len(pages_u64):
        # Many candidates: one OR-reduction over the chunk beats gathering them (no copy).
        return np.bitwise_or.reduce(pages_u64, axis=1) == 0
    out = np.zeros(len(pages_u64), dtype=bool)
    out[candidates] = np.bitwise_or.reduce(pages_u64[candidates], axis=1) == 0
    return out


def run_bounds(index: np.ndarray, also: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of consecutive page numbers in ``index`` starts and ends (positions in
    ``index``, end exclusive). ``also`` (a bool for each position after the first) breaks a
    run there too."""
    brk = np.diff(index) != 1
    if also is not None:
        brk |= also
    breaks = np.flatnonzero(brk) + 1
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [len(index)]))


def page_runs(block: np.ndarray, index: np.ndarray, page_size: int) -> list[memoryview]:
    """Zero-copy views of ``block`` (flat uint8) covering pages ``index``, one per run of
    consecutive page numbers, in the order of ``index``."""
    if len(index) == 0:
        return []
    starts, ends = run_bounds(index)
    first = index[starts].tolist()
    last = index[ends - 1].tolist()
    mv = memoryview(block).cast("B")
    return [mv[f * page_size : (la + 1) * page_size] for f, la in zip(first, last, strict=True)]


def offsets_to_index(offsets: np.ndarray, page_size: int) -> np.ndarray:
    """Page numbers of page-aligned byte offsets (as int64 for indexing)."""
    return (offsets // np.uint64(page_size)).astype(np.int64)
