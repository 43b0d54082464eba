"""Block digests of sparse files (holes hashed from zeros, not read), the write-back thread and
the connection gate's wake-up."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import blake3
import numpy as np
import pytest

from multifd_core.engine.digest import MIN_HOLE, data_extents, digest_of, digest_of_file
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.writeback import Writeback, flush_beside
from multifd_core.session.transport import ConnectionGate
from multifd_core.testing import require


def _sparse_file(path: Path, length: int, writes: list[tuple[int, bytes]]) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, length)
    for off, data in writes:
        os.pwrite(fd, data, off)
    return fd


@pytest.mark.parametrize("seed", range(12))
def test_sparse_digest_equals_the_digest_of_every_byte(tmp_path: Path, seed: int) -> None:
    """Random data runs between holes large and small, a region at an offset: the digest is
    BLAKE3 of the bytes, and every non-zero byte lies in a reported data range."""
    rng = random.Random(seed)
    length = rng.choice([2 << 20, 3 * MIN_HOLE + 12288, 9 * MIN_HOLE])
    writes = []
    for _ in range(rng.randint(0, 30)):
        off = rng.randrange(0, length)
        writes.append((off, os.urandom(min(rng.randint(1, 3 << 20), length - off))))
    fd = _sparse_file(tmp_path / "f", length, writes)
    try:
        offset = rng.choice([0, 4096, 1 << 20])
        size = length - offset - rng.choice([0, 4096])
        raw = os.pread(fd, size, offset)
        block = RamBlock.map_region(fd, "r", offset, size, writable=True)
        assert block.digest() == blake3.blake3(raw).hexdigest()
        nonzero = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8))
        covered = np.zeros(size, dtype=bool)
        for start, end in data_extents(fd, offset, size):
            assert 0 <= start < end <= size
            covered[start:end] = True
        assert covered[nonzero].all()
        block.close()
    finally:
        os.close(fd)


def test_large_holes_are_not_read(tmp_path: Path) -> None:
    """A 1 GiB file with 1 MiB of data: one data range, the rest skipped."""
    fd = _sparse_file(tmp_path / "f", 1 << 30, [(5 << 20, os.urandom(1 << 20))])
    try:
        extents = data_extents(fd, 0, 1 << 30)
        assert len(extents) == 1 and sum(e - s for s, e in extents) <= 2 * MIN_HOLE
        view = memoryview(bytearray(1 << 30))  # what a mapping of the file reads
        view[5 << 20 : 6 << 20] = os.pread(fd, 1 << 20, 5 << 20)
        assert digest_of_file(view, fd) == digest_of(view)
    finally:
        os.close(fd)


def test_manifest_digest_is_what_b3sum_prints(tmp_path: Path) -> None:
    require(shutil.which("b3sum") is not None, "needs b3sum: apt-get install b3sum")
    path = tmp_path / "block.ram"
    fd = _sparse_file(path, 3 * MIN_HOLE, [(MIN_HOLE + 7, b"data" * 1000)])
    block = RamBlock.from_fd(fd, "b", 3 * MIN_HOLE)
    out = subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert block.digest() == out
    block.close()


def test_writeback_stop_does_not_wait_and_closes_its_descriptors(tmp_path: Path) -> None:
    fd = _sparse_file(tmp_path / "f", 1 << 20, [(0, os.urandom(1 << 20))])
    before = set(os.listdir("/proc/self/fd"))
    wb = Writeback([fd], interval=0.01).start()
    assert len(set(os.listdir("/proc/self/fd")) - before) == 1  # its own duplicate
    os.close(fd)  # the caller may close its descriptor while the thread still runs
    wb.stop()
    wb._thread.join(10)
    assert not wb._thread.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_writeback_never_started_closes_its_descriptors(tmp_path: Path) -> None:
    fd = _sparse_file(tmp_path / "f", 4096, [])
    before = set(os.listdir("/proc/self/fd"))
    Writeback([fd]).stop()
    assert set(os.listdir("/proc/self/fd")) <= before
    os.close(fd)


def test_flush_beside_returns_the_work_and_logs_both_durations(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The hash and the flush run beside each other; ``-vv`` says how long each took, so a
    slow tail shows which of the two it waited for."""
    block = RamBlock.create_file(tmp_path / "b.ram", "b", 1 << 20)
    block.write_pages(np.array([3]), os.urandom(4096))
    with caplog.at_level("DEBUG", logger="multifd.writeback"):
        result, failed = flush_beside([block], lambda: block.digest())
    block.close()
    assert result == blake3.blake3((tmp_path / "b.ram").read_bytes()).hexdigest()
    assert failed == []
    assert re.search(r"the work took \d+\.\d{3} s, the flush \d+\.\d{3} s", caplog.text)


def test_gate_wake_ends_a_poll() -> None:
    """A handshake finishing on another thread wakes the accepting loop at once (it used to
    sleep out its poll, delaying every session's ACCEPT)."""
    listener = socket.create_server(("127.0.0.1", 0))
    gate = ConnectionGate(listener, 4, reject=lambda s, why: s.close())
    returned = threading.Event()
    poller = threading.Thread(target=lambda: (gate.poll(120), returned.set()))
    poller.start()
    gate.wake()
    poller.join(30)
    assert returned.is_set()
    gate.close()
    listener.close()


# ----------------------------------------------------------- read-only files: holes kept


def _resident_kib(path: Path) -> int:
    """Rss (KiB) of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.parametrize("seed", range(6))
def test_a_read_only_file_keeps_its_holes_and_the_same_digest_and_zero_pages(
        tmp_path: Path, seed: int) -> None:
    """``from_file`` records the holes; the digest and the sender's zero-page scan (contiguous
    and scattered pages) equal those that read every byte."""
    from multifd_core.wire.packetizer import scan_zero
    from multifd_core.wire.pages import zero_mask

    rng = random.Random(seed)
    length = rng.choice([3 * MIN_HOLE + 12288, 9 * MIN_HOLE])
    writes = []
    for _ in range(rng.randint(0, 12)):
        off = rng.randrange(0, length, 4096) + rng.choice([0, 100])
        data = bytearray(os.urandom(min(rng.randint(1, 2 << 20), length - off)))
        data[: rng.choice([0, 4096])] = bytes(min(4096, len(data)))  # some zero pages in data
        writes.append((off, bytes(data)))
    os.close(_sparse_file(tmp_path / "f", length, writes))
    raw = (tmp_path / "f").read_bytes()
    block = RamBlock.from_file(tmp_path / "f", "f")
    try:
        assert block.holes is not None
        assert block.digest() == blake3.blake3(raw).hexdigest()
        words = np.frombuffer(raw, dtype=np.uint64).reshape(block.n_pages, 512)
        want = zero_mask(words)
        for first, n in ((0, block.n_pages), (7, block.n_pages - 9), (MIN_HOLE // 4096, 3)):
            index = np.arange(first, first + n)
            got = scan_zero(block.words, index, first, n, True, block.holes)
            assert np.array_equal(got, want[index])
        index = np.sort(np.array(rng.sample(range(block.n_pages), 500)))
        got = scan_zero(block.words, index, int(index[0]), len(index), False, block.holes)
        assert np.array_equal(got, want[index])
    finally:
        block.close()


def test_sending_and_hashing_a_sparse_file_does_not_read_its_holes(tmp_path: Path) -> None:
    """64 MiB with 2 MiB of data: planning every page and hashing the block leave the holes
    out of the page cache (reading them would map 64 MiB)."""
    from multifd_core.wire.packetizer import plan_batch

    path = tmp_path / "sparse.img"
    os.close(_sparse_file(path, 64 << 20, [(8 << 20, os.urandom(2 << 20))]))
    block = RamBlock.from_file(path, "sparse")
    try:
        plan = plan_batch(block.array, block.words, np.arange(block.n_pages), 4096, 128,
                          True, block.holes)
        assert len(plan.normal) == 512 and len(plan.zero) == block.n_pages - 512
        assert block.digest() == blake3.blake3(path.read_bytes()).hexdigest()
        assert _resident_kib(path) <= 2 * MIN_HOLE // 1024, _resident_kib(path)
    finally:
        block.close()
