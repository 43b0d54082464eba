"""The embedded default workload: a deterministic mixed RAM image.

About 40% zero pages, 30% text-like pages (words from a small vocabulary, compressible) and
30% random pages, shuffled at page granularity with a fixed seed, generated with numpy.
"""

from __future__ import annotations

import os

import numpy as np

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more can out up time into memory page guest host channel packet migration "
    "kernel device block offset sync zero buffer thread socket stream vector register cache"
).split()


def mixed_kinds(n_pages: int, seed: int = 42) -> np.ndarray:
    """Page kinds: 0 zero, 1 text-like, 2 random (40/30/30), shuffled."""
    rng = np.random.default_rng(seed)
    kinds = np.zeros(n_pages, dtype=np.uint8)
    n_text = n_pages * 3 // 10
    n_rand = n_pages * 3 // 10
    kinds[:n_text] = 1
    kinds[n_text : n_text + n_rand] = 2
    rng.shuffle(kinds)
    return kinds


def _corpus(rng: np.random.Generator, size: int) -> np.ndarray:
    words = np.array([w.encode() + b" " for w in _WORDS], dtype=object)
    picks = rng.integers(0, len(words), size // 4)
    text = b"".join(words[picks].tolist())
    while len(text) < size:
        text += text
    return np.frombuffer(text[:size], dtype=np.uint8)


def fill_mixed(pages: np.ndarray, seed: int = 42, *, zero: bool = True) -> np.ndarray:
    """Fill a ``(n, page_size)`` uint8 array in place; return the page kinds.

    ``zero=False`` leaves zero pages untouched (fresh memory or a sparse file).
    """
    n, ps = pages.shape
    kinds = mixed_kinds(n, seed)
    rng = np.random.default_rng(seed + 1)
    corpus = _corpus(rng, 8 << 20)
    text_idx = np.flatnonzero(kinds == 1)
    rand_idx = np.flatnonzero(kinds == 2)
    chunk = 4096
    for start in range(0, len(text_idx), chunk):
        idx = text_idx[start : start + chunk]
        offs = rng.integers(0, len(corpus) - ps, len(idx))
        pages[idx] = corpus[offs[:, None] + np.arange(ps)]
    for start in range(0, len(rand_idx), chunk):
        idx = rand_idx[start : start + chunk]
        pages[idx] = np.frombuffer(rng.bytes(len(idx) * ps), dtype=np.uint8).reshape(-1, ps)
    if zero:
        pages[kinds == 0] = 0
    return kinds


def write_mixed_image(path: str | os.PathLike[str], size: int, *, page_size: int = 4096,
                      seed: int = 42) -> None:
    """Write the mixed image to ``path`` (sparse where pages are zero)."""
    import mmap

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            pages = np.frombuffer(mm, dtype=np.uint8).reshape(-1, page_size)
            fill_mixed(pages, seed, zero=False)
            del pages
            mm.flush()
    finally:
        os.close(fd)
