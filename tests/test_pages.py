"""The vectorised page helpers, each checked directly against a plain reference.

``zero_mask``, ``page_runs``, ``plan_batch`` and ``RamHeaderWriter.fill`` take shortcuts (a
first-word filter, a gather-or-reduce switch, 512 KiB scan steps, vectorised run splitting, a
header buffer reused packet after packet). A whole migration passes even when a shortcut is
wrong for pages it happens not to meet, so the layouts here are built to meet them: pages zero
but for one byte (first, middle, last), every density on both sides of each switch, packets
that shrink after a full one. The references are per-page Python loops and
``wire.encode_ram_packet``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd_core import wire
from multifd_core.errors import WireError
from multifd_core.wire.packetizer import plan_batch
from multifd_core.wire.pages import SCAN_BYTES, page_runs, zero_mask

PS = 4096
STEP = SCAN_BYTES // PS  # rows in one zero_mask scan step for 4 KiB pages
SETTINGS = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- references


def ref_is_zero(page: np.ndarray) -> bool:
    return page.tobytes() == bytes(page.nbytes)


def ref_zero_mask(pages: np.ndarray) -> list[bool]:
    return [ref_is_zero(p) for p in pages]


def ref_runs(index: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive page numbers, in the order of ``index``."""
    runs: list[list[int]] = []
    for i in index:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def run_bytes(pages: np.ndarray, runs: list[list[int]]) -> list[bytes]:
    return [b"".join(pages[i].tobytes() for i in run) for run in runs]


def be_offsets(index: list[int], ps: int) -> bytes:
    return b"".join((i * ps).to_bytes(8, "big") for i in index)


# --------------------------------------------------------------------------- layouts

#: Byte positions of the single non-zero byte: the first word, its last byte, the second word,
#: the middle, the last word and the last byte of the page.
POSITIONS = (0, 7, 8, PS // 2 - 1, PS // 2, PS - 8, PS - 1)


def layout(n: int, candidates: int, pos: int, ps: int = PS,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` pages of which ``candidates`` have a zero first word (spread over the range).
    Every other candidate is zero but for byte ``pos``; the rest are zero; the non-candidates
    have data in their first word."""
    pages = np.zeros((n, ps), dtype=np.uint8)
    pages[:, pos if pos < 8 else 0] = 0xA5  # non-candidates: first word non-zero
    if rng is None:
        picked = np.linspace(0, n - 1, candidates).astype(np.int64)
    else:
        picked = np.sort(rng.choice(n, size=candidates, replace=False))
    pages[picked] = 0
    for j, row in enumerate(picked):
        if j % 2 and pos >= 8:
            pages[row, pos] = 1 + j % 255
    return pages


def densities(n: int) -> list[int]:
    """Candidate counts on both sides of zero_mask's gather/reduce switch (4 * k >= n)."""
    k = -(-n // 4)
    return sorted({c for c in (0, 1, 2, k - 1, k, k + 1, n // 2, n - 1, n) if 0 <= c <= n})


SIZES = (1, 2, 3, 4, 5, 7, 8, 9, STEP - 1, STEP, STEP + 1, 2 * STEP + 3)


# --------------------------------------------------------------------------- zero_mask


@pytest.mark.parametrize("pos", POSITIONS)
def test_zero_mask_one_byte_pages_at_every_density(pos: int) -> None:
    for n in SIZES:
        for k in densities(n):
            pages = layout(n, k, pos)
            got = zero_mask(pages.view(np.uint64)).tolist()
            assert got == ref_zero_mask(pages), (n, k, pos)


@pytest.mark.parametrize("ps", [512, 8192, 65536])
def test_zero_mask_other_page_sizes(ps: int) -> None:
    step = SCAN_BYTES // ps
    for n in (1, 3, step - 1, step, step + 1, 2 * step + 1):
        for k in densities(n):
            for pos in (8, ps // 2, ps - 1):
                pages = layout(n, k, pos, ps)
                assert zero_mask(pages.view(np.uint64)).tolist() == ref_zero_mask(pages), \
                    (ps, n, k, pos)


def test_zero_mask_chunks_of_different_density() -> None:
    """One scan step dense (reduce), the next sparse (gather), the next dense again: the
    switch is taken per step and the steps are stitched in order."""
    parts = [layout(STEP, STEP, PS - 1), layout(STEP, 3, PS // 2), layout(STEP // 2, 40, 9)]
    pages = np.concatenate(parts)
    assert zero_mask(pages.view(np.uint64)).tolist() == ref_zero_mask(pages)


@SETTINGS
@given(n=st.integers(1, 3 * STEP + 5), density=st.floats(0, 1),
       ps=st.sampled_from([512, 4096, 16384]), seed=st.integers(0, 2**32 - 1))
def test_zero_mask_matches_the_reference(n: int, density: float, ps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pos = int(rng.integers(8, ps))
    pages = layout(n, round(density * n), pos, ps, rng)
    assert zero_mask(pages.view(np.uint64)).tolist() == ref_zero_mask(pages)


# --------------------------------------------------------------------------- page_runs


def numbered_block(n: int, ps: int = PS) -> np.ndarray:
    """Pages that differ from each other in every word (page i holds i+1 everywhere)."""
    return np.repeat(np.arange(1, n + 1, dtype=np.uint16), ps // 2).view(np.uint8).copy()


@SETTINGS
@given(st.lists(st.integers(0, 63), max_size=80))
def test_page_runs_matches_the_reference(index: list[int]) -> None:
    block = numbered_block(64)
    pages = block.reshape(64, PS)
    views = page_runs(block, np.asarray(index, dtype=np.int64), PS)
    assert [bytes(v) for v in views] == run_bytes(pages, ref_runs(index))
    for v in views:  # zero-copy: each view lies in the block
        assert np.shares_memory(np.frombuffer(v, dtype=np.uint8), block)


@pytest.mark.parametrize("index", [[0], [63], [0, 1], [1, 0], [0, 2], [5, 6, 7, 9, 10, 3],
                                   [0, 1, 2, 2, 3], list(range(64))])
def test_page_runs_edges(index: list[int]) -> None:
    block = numbered_block(64)
    got = [bytes(v) for v in page_runs(block, np.asarray(index, dtype=np.int64), PS)]
    assert got == run_bytes(block.reshape(64, PS), ref_runs(index))


# --------------------------------------------------------------------------- plan_batch


def check_plan(pages: np.ndarray, index: list[int], per_packet: int,
               detect_zero: bool = True) -> None:
    """``plan_batch`` against a per-page loop, packet by packet."""
    n_pages, ps = pages.shape
    block = pages.reshape(-1)
    plan = plan_batch(block, block.view(np.uint64).reshape(n_pages, ps // 8),
                      np.asarray(index, dtype=np.int64), ps, per_packet, detect_zero)
    chunks = [index[i:i + per_packet] for i in range(0, len(index), per_packet)]
    assert plan.packets == len(chunks)
    for p, chunk in enumerate(chunks):
        zero = [i for i in chunk if detect_zero and ref_is_zero(pages[i])]
        normal = [i for i in chunk if i not in zero]
        n0, n1 = plan.normal_bounds[p], plan.normal_bounds[p + 1]
        z0, z1 = plan.zero_bounds[p], plan.zero_bounds[p + 1]
        assert plan.normal[n0:n1].tolist() == normal, p
        assert plan.zero[z0:z1].tolist() == zero, p
        assert bytes(plan.normal_be[8 * n0:8 * n1]) == be_offsets(normal, ps), p
        assert bytes(plan.zero_be[8 * z0:8 * z1]) == be_offsets(zero, ps), p
        runs = plan.runs[plan.run_bounds[p]:plan.run_bounds[p + 1]]
        assert [bytes(r) for r in runs] == run_bytes(pages, ref_runs(normal)), p


def mixed(n: int, zero_every: int, pos: int = PS // 2, ps: int = PS) -> np.ndarray:
    """Numbered pages; every ``zero_every``-th is zero, and the one after it is zero but for
    byte ``pos`` (a non-zero page with a zero first word)."""
    pages = numbered_block(n, ps).reshape(n, ps)
    if zero_every:
        pages[::zero_every] = 0
        tail = pages[1::zero_every]
        tail[:] = 0
        tail[:, pos] = 9
    return pages


@pytest.mark.parametrize("per_packet", [1, 2, 3, 8, 128])
@pytest.mark.parametrize("zero_every", [0, 1, 2, 3, 5, 64])
def test_plan_batch_contiguous(per_packet: int, zero_every: int) -> None:
    pages = mixed(300, zero_every)
    for first, n in ((0, 300), (1, 257), (5, per_packet), (7, per_packet + 1), (299, 1)):
        check_plan(pages, list(range(first, first + min(n, 300 - first))), per_packet)


@pytest.mark.parametrize("per_packet", [1, 3, 8, 128])
@pytest.mark.parametrize("zero_every", [0, 2, 3, 7])
def test_plan_batch_gathered(per_packet: int, zero_every: int) -> None:
    """Ascending indexes with holes: gathered rows, runs that end at holes and at packet
    boundaries, a hole right at a boundary."""
    pages = mixed(300, zero_every)
    rng = np.random.default_rng(per_packet * 31 + zero_every)
    for index in ([0, 2], [0, 1, 2, 4, 5, 6, 8], list(range(0, 300, 2)),
                  [i for i in range(300) if i % per_packet != per_packet - 1 or i == 0],
                  sorted(rng.choice(300, 200, replace=False).tolist())):
        check_plan(pages, index, per_packet)


def test_plan_batch_without_zero_detection() -> None:
    pages = mixed(64, 2)
    check_plan(pages, list(range(64)), 8, detect_zero=False)
    check_plan(pages, list(range(0, 64, 3)), 8, detect_zero=False)


def test_plan_batch_all_zero_and_no_zero() -> None:
    check_plan(np.zeros((40, PS), dtype=np.uint8), list(range(40)), 16)
    check_plan(np.zeros((40, PS), dtype=np.uint8), list(range(0, 40, 3)), 16)
    check_plan(numbered_block(40).reshape(40, PS), list(range(40)), 16)


@SETTINGS
@given(data=st.data(), n_pages=st.integers(1, 2 * STEP + 20),
       per_packet=st.sampled_from([1, 2, 5, 16, 128]), zero_every=st.integers(0, 6),
       contiguous=st.booleans())
def test_plan_batch_matches_the_reference(data: st.DataObject, n_pages: int, per_packet: int,
                                          zero_every: int, contiguous: bool) -> None:
    pages = mixed(n_pages, zero_every, pos=data.draw(st.integers(8, PS - 1)))
    if contiguous:
        first = data.draw(st.integers(0, n_pages - 1))
        index = list(range(first, data.draw(st.integers(first + 1, n_pages))))
    else:
        index = sorted(data.draw(st.sets(st.integers(0, n_pages - 1), min_size=1)))
    check_plan(pages, index, per_packet)


# --------------------------------------------------------------------------- RamHeaderWriter


def check_fills(sizes: list[tuple[int, int]], ps: int = PS, name: str = "pc.ram") -> None:
    """Fill one writer packet after packet; each result must equal a fresh
    ``encode_ram_packet`` (offset slots past the counts zero, counts and numbers right)."""
    writer = wire.RamHeaderWriter(ps, 0x04, name)
    count = wire.page_count(ps)
    for num, (n_normal, n_zero) in enumerate(sizes, start=1):
        normal = [(7 * i + 1) % (4 * count) for i in range(n_normal)]
        zero = [(5 * i + 3) % (4 * count) for i in range(n_zero)]
        size = n_normal * 100 + num
        got = writer.fill(be_offsets(normal, ps), be_offsets(zero, ps), size, num)
        want = wire.encode_ram_packet(page_size=ps, flags=0x04, packet_num=num, ramblock=name,
                                      normal=[i * ps for i in normal],
                                      zero=[i * ps for i in zero], next_packet_size=size)
        assert bytes(got) == bytes(want), (num, n_normal, n_zero)


def test_header_writer_packets_that_shrink_after_a_full_one() -> None:
    c = wire.page_count(PS)
    check_fills([(c, 0), (1, 0), (0, c), (0, 1), (c - 1, 1), (3, 2), (0, 0), (c, 0), (2, 0)])


def test_header_writer_grows_and_shrinks_by_one() -> None:
    c = wire.page_count(PS)
    check_fills([(n, 0) for n in range(c, -1, -1)] + [(0, n) for n in range(c + 1)])


def test_header_writer_refuses_too_many_pages() -> None:
    c = wire.page_count(PS)
    w = wire.RamHeaderWriter(PS, 0, "ram")
    with pytest.raises(WireError, match="too many pages"):
        w.fill(bytes(8 * c), bytes(8), 0, 1)


@SETTINGS
@given(sizes=st.lists(st.tuples(st.integers(0, 128), st.integers(0, 128)), min_size=1,
                      max_size=12).map(lambda s: [(a, min(b, 128 - a)) for a, b in s]),
       ps=st.sampled_from([4096, 8192, 65536]))
def test_header_writer_matches_encode_ram_packet(sizes: list[tuple[int, int]], ps: int) -> None:
    c = wire.page_count(ps)
    check_fills([(min(a, c), min(b, c - min(a, c))) for a, b in sizes], ps)
