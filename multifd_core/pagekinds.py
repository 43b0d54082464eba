"""Page contents for tests and benchmarks: zero, text-like, random, sparse and repeated pages.

Re-exported by ``multifd_core.testing`` (``make_pages``, ``mixed_pages``, ``KINDS``); kept free
of pytest so the vendor benchmark runs from an installed wheel.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "make_pages", "mixed_pages"]

KINDS = ("zero", "text", "random", "sparse", "repeat")


def make_pages(kind: str, n: int, page_size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` pages of one content ``kind`` (see ``KINDS``) as a ``(n, page_size)`` uint8 array."""
    size = n * page_size
    if kind == "zero":
        flat = np.zeros(size, dtype=np.uint8)
    elif kind == "random":
        flat = rng.integers(0, 256, size, dtype=np.uint8)
    elif kind == "text":
        flat = _text(size, rng)
    elif kind == "sparse":  # mostly zero with a few words set, like fresh guest memory
        flat = np.zeros(size, dtype=np.uint8)
        idx = rng.integers(0, size, max(1, size // 64))
        flat[idx] = rng.integers(1, 256, len(idx), dtype=np.uint8)
    elif kind == "repeat":  # one random page repeated: long matches within the packet
        flat = np.tile(rng.integers(0, 256, page_size, dtype=np.uint8), n)
    else:
        raise ValueError(f"unknown page kind {kind!r}; kinds: {', '.join(KINDS)}")
    return flat.reshape(n, page_size)


def _text(size: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    words = [letters[rng.integers(0, 26, int(k))].tobytes() for k in rng.integers(2, 10, 400)]
    picks = rng.integers(0, len(words), size // 4 + 8)
    text = b" ".join(words[i] for i in picks.tolist())
    return np.frombuffer(text[:size], dtype=np.uint8).copy()


def mixed_pages(n: int, page_size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` pages whose kinds vary in runs, as in a guest's RAM."""
    out = np.empty((n, page_size), dtype=np.uint8)
    i = 0
    while i < n:
        run = int(rng.integers(1, 9))
        kind = KINDS[int(rng.integers(0, len(KINDS)))]
        out[i : i + run] = make_pages(kind, min(run, n - i), page_size, rng)
        i += run
    return out
