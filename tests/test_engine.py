"""The engine end to end over loopback TCP, and the receiver's barrier on raw sockets."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from multifd_core import Method, hookimpl, wire
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.receiver import Receiver
from multifd_core.errors import MultiFDError, TransportError, WireError
from multifd_core.image import fill_mixed
from multifd_core.loopback import migrate
from multifd_core.methods.registry import default_registry
from multifd_core.testing import wait_until

PS = 4096


def mixed_block(name: str, mib: int, seed: int = 1) -> RamBlock:
    buf = np.zeros(mib << 20, dtype=np.uint8)
    fill_mixed(buf.reshape(-1, PS), seed)
    return RamBlock(name, buf)


@pytest.mark.parametrize("channels", [1, 2, 8])
def test_loopback_round_trip(channels: int) -> None:
    src = [mixed_block("pc.ram", 16), RamBlock("pc.bios", bytearray(b"\xaa" * (64 * PS))),
           RamBlock("/rom@etc/acpi/tables", bytearray(PS))]
    dst, stats = migrate(src, channels=channels)
    for s, d in zip(src, dst, strict=True):
        assert d.name == s.name and (d.array == s.array).all()
    assert len(stats.packets_per_channel) == channels
    assert stats.normal_pages + stats.zero_pages == sum(b.n_pages for b in src)
    # About 40% of the mixed block and the whole zero ROM are zero pages.
    assert 0.35 < stats.zero_pages / src[0].n_pages < 0.45
    assert stats.digests["pc.ram"] == src[0].digest()


def test_rounds_later_copy_wins() -> None:
    block = mixed_block("pc.ram", 8)
    pages = block.pages
    rng = np.random.default_rng(5)
    dirty = [np.sort(rng.choice(block.n_pages, 300, replace=False)) for _ in range(4)]

    def before(i: int) -> None:
        if i:
            pages[dirty[i]] = rng.integers(0, 255, (300, PS), dtype=np.uint8)
            pages[dirty[i][:50]] = 0  # some pages become zero in a later round

    rounds = [{"pc.ram": None}] + [{"pc.ram": dirty[i]} for i in range(1, 4)]
    dst, stats = migrate([block], channels=4, rounds=rounds, before_round=before)
    assert stats.rounds == 4
    assert (dst[0].array == block.array).all()


def _serve_sockets(receiver: Receiver, n: int) -> list[socket.socket]:
    """Connected socket pairs: our ends for writing, the receiver's ends accepted."""
    ours = []
    for i in range(n):
        a, b = socket.socketpair()
        a.sendall(wire.encode_init(bytes(16), i))
        receiver.accept_channel(b)
        ours.append(a)
    return ours


def _data_packet(offsets: list[int], num: int, flags: int = 0) -> bytes:
    return bytes(wire.encode_ram_packet(page_size=PS, flags=flags, packet_num=num,
                                        ramblock="ram", normal=offsets,
                                        next_packet_size=len(offsets) * PS))


def test_barrier_orders_rounds_under_reordering() -> None:
    """Channel 1 races ahead with round 1's copy of page 5 while channel 0 still holds round
    0's copy; the barrier must make round 1's copy win."""
    block = RamBlock.zeros("ram", 16 * PS)
    rx = Receiver(default_registry().create("none"), channels=2, uuid=bytes(16), timeout=10)
    rx.set_blocks([block])
    ch0, ch1 = _serve_sockets(rx, 2)
    old, new = b"A" * PS, b"B" * PS
    # Channel 1: SYNC (round 0), then page 5 = new, SYNC (round 1) - all at once.
    ch1.sendall(wire.encode_sync_packet(1, PS) + _data_packet([5 * PS], 3) + new
                + wire.encode_sync_packet(4, PS))
    rounds: list[int] = []
    main = threading.Thread(target=lambda: rounds.extend([rx.sync_round(), rx.sync_round()]))
    main.start()
    # Channel 1's round-1 copy is on the wire first, but the channel waits at its SYNC: it
    # applies nothing past it until round 0 is complete, which needs channel 0's SYNC.
    wait_until(lambda: rx.stats[1].sync_packets == 1, "channel 1 at its round-0 SYNC")
    assert rx.stats[1].packets == 0 and block.pages[5].tobytes() == bytes(PS)
    ch0.sendall(_data_packet([5 * PS], 2) + old + wire.encode_sync_packet(5, PS)
                + wire.encode_sync_packet(6, PS))
    main.join(10)
    assert rounds and rounds[-1] >= 5
    ch0.close()
    ch1.close()
    rx.finish()
    assert block.pages[5].tobytes() == new


def test_zero_pages_only_overwrite_received_pages() -> None:
    """QEMU: a zero page over a page never received leaves memory alone (fresh memory is
    zero); over a received page it writes zeros. ``fresh=False`` always writes."""
    for fresh, expect_untouched in ((True, b"\x77"), (False, b"\0")):
        block = RamBlock("ram", bytearray(b"\x77" * (8 * PS)))
        rx = Receiver(default_registry().create("none"), channels=1, timeout=10, fresh=fresh)
        rx.set_blocks([block])
        (ch,) = _serve_sockets(rx, 1)
        ch.sendall(_data_packet([PS], 1) + b"\x55" * PS + wire.encode_sync_packet(2, PS))
        rx.sync_round()
        zero_pkt = wire.encode_ram_packet(page_size=PS, flags=0, packet_num=3, ramblock="ram",
                                          normal=[], zero=[PS, 2 * PS], next_packet_size=0)
        ch.sendall(zero_pkt)
        ch.close()
        rx.finish()
        assert block.pages[1].tobytes() == bytes(PS)  # received, then zeroed
        assert block.pages[2].tobytes() == expect_untouched * PS


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (_data_packet([PS], 1, flags=0x04) + b"x" * PS, "flags received 4 flags expected 0"),
        (_data_packet([64 * PS], 1) + b"x" * PS, "offset too long"),
        (_data_packet([PS], 1)[:600], "unexpected EOF after packet header"),
        (_data_packet([PS], 1) + b"x" * 100, "unexpected EOF in packet payload"),
        (b"\x11\x22\x33\x44\0\0\0\2" + bytes(1336), "received packet version 2"),
    ],
)
def test_receiver_refuses_bad_packets(payload: bytes, text: str) -> None:
    block = RamBlock.zeros("ram", 16 * PS)
    rx = Receiver(default_registry().create("none"), channels=1, timeout=10)
    rx.set_blocks([block])
    (ch,) = _serve_sockets(rx, 1)
    ch.sendall(payload)
    ch.close()
    with pytest.raises(WireError, match=text) as err:
        rx.finish()
    assert err.value.channel == 0
    # Nothing lands outside the packet's own page (a truncated raw payload may fill part of it,
    # straight from the socket; the session is then failed and its output stays partial).
    assert not np.delete(block.pages, 1, axis=0).any()


def test_receiver_times_out_on_a_stalled_channel() -> None:
    rx = Receiver(default_registry().create("none"), channels=1, timeout=0.5)
    rx.set_blocks([RamBlock.zeros("ram", PS)])
    (ch,) = _serve_sockets(rx, 1)
    ch.sendall(b"\x11\x22")
    t = time.monotonic()
    with pytest.raises(TransportError, match="no data for 0.5 s"):
        rx.finish(timeout=5)
    assert time.monotonic() - t < 3
    ch.close()


def test_sync_round_reports_missing_channels() -> None:
    rx = Receiver(default_registry().create("none"), channels=2, timeout=0.5)
    rx.set_blocks([RamBlock.zeros("ram", PS)])
    with pytest.raises(TransportError, match="2 channel\\(s\\) never connected"):
        rx.sync_round()


def test_sender_rejects_bad_page_numbers() -> None:
    from multifd_core.engine.sender import Sender

    a, b = socket.socketpair()
    s = Sender(default_registry().create("none"), [a], timeout=5)
    with pytest.raises(MultiFDError, match="page index out of range"):
        s.queue_pages(RamBlock.zeros("ram", PS), np.array([1]))
    # plan_batch takes an index whose ends span exactly n pages for a contiguous range: an
    # unsorted [0, 2, 1, 3] would be scanned as pages 0..3 and page 2 sent as page 1's zero.
    for index in ([0, 2, 1, 3], [0, 0, 2], [3, 2]):
        with pytest.raises(MultiFDError, match="must be ascending and unique"):
            s.queue_pages(RamBlock.zeros("ram", 4 * PS), np.array(index))
    s.abort()
    b.close()


class _RawViaWrite(Method):
    """A test method: raw pages, placed with write_pages (the path compressed methods take)."""

    name = "rawwrite"
    code = 0x00

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * self.page_size

    @hookimpl
    def send_prepare(self, channel, packet):
        return [packet.data()]

    @hookimpl
    def recv(self, channel, packet):
        packet.write_pages(bytes(packet.read_payload()))


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_write_pages_honours_unsorted_offsets(kind: str, tmp_path) -> None:
    """QEMU's zero-page split swaps offsets, so normal offsets arrive unsorted; a list like
    [1, 3, 2, 4] spans 4 pages but is not one run (regression: it was written as one)."""
    block = RamBlock.zeros("ram", 8 * PS) if kind == "memory" else \
        RamBlock.create_file(tmp_path / "ram", "ram", 8 * PS)
    rx = Receiver(_RawViaWrite(), channels=1, timeout=10)
    rx.set_blocks([block])
    (ch,) = _serve_sockets(rx, 1)
    pages = [b"A" * PS, b"C" * PS, b"B" * PS, b"D" * PS]
    ch.sendall(_data_packet([1 * PS, 3 * PS, 2 * PS, 4 * PS], 1) + b"".join(pages))
    ch.close()
    rx.finish()
    assert [block.pages[i].tobytes()[:1] for i in range(1, 5)] == [b"A", b"B", b"C", b"D"]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_ramblock_write_pages(kind: str, tmp_path) -> None:
    """Scattered, unsorted and adjacent pages land where their index says, through the
    mapping or (file-backed) pwrite; the mapping sees pwrite's pages; bad calls are refused."""
    block = RamBlock.zeros("ram", 16 * PS) if kind == "memory" else \
        RamBlock.create_file(tmp_path / "ram", "ram", 16 * PS)
    assert block.file_backed is (kind == "file")
    index = np.array([9, 2, 3, 4, 15, 0, 7, 6], dtype=np.int64)
    data = np.repeat(np.arange(1, 9, dtype=np.uint8), PS)
    block.write_pages(index, data)
    expected = np.zeros(16, dtype=np.uint8)
    expected[index] = np.arange(1, 9)
    assert np.array_equal(block.pages[:, 0], expected)
    assert np.array_equal(block.pages[:, -1], expected)
    if kind == "file":
        block.flush()
        on_disk = np.fromfile(tmp_path / "ram", dtype=np.uint8).reshape(16, PS)
        assert np.array_equal(on_disk[:, 0], expected)
    with pytest.raises(MultiFDError, match="page 16 outside its 16 pages"):
        block.write_pages(np.array([16]), bytes(PS))
    with pytest.raises(MultiFDError, match=f"{PS - 1} bytes for 1 pages"):
        block.write_pages(np.array([1]), bytes(PS - 1))
    assert block.pages[1, 0] == 0
    block.close()


def test_idle_channel_is_fine_while_another_moves() -> None:
    """Channel 1 has nothing to send for longer than the timeout while channel 0 keeps
    delivering: not a stall. Only when nothing moves anywhere does a channel time out."""
    block = RamBlock.zeros("ram", 64 * PS)
    rx = Receiver(default_registry().create("none"), channels=2, timeout=0.6)
    rx.set_blocks([block])
    ch0, ch1 = _serve_sockets(rx, 2)
    for i in range(8):  # 1.6 s of steady traffic on channel 0 only
        ch0.sendall(_data_packet([i * PS], i + 1) + bytes([i + 1]) * PS)
        time.sleep(0.2)
    ch0.sendall(wire.encode_sync_packet(20, PS))
    ch1.sendall(wire.encode_sync_packet(21, PS))
    rx.sync_round()
    ch0.close()
    ch1.close()
    rx.finish()
    assert [block.pages[i][0] for i in range(8)] == list(range(1, 9))
    # And with nothing moving anywhere, the idle channels do time out.
    rx2 = Receiver(default_registry().create("none"), channels=1, timeout=0.5)
    rx2.set_blocks([RamBlock.zeros("ram", PS)])
    (idle,) = _serve_sockets(rx2, 1)
    with pytest.raises(TransportError, match="no data for 0.5 s"):
        rx2.finish(timeout=5)
    idle.close()


def test_finish_waits_for_a_channel_accepted_just_before(monkeypatch) -> None:
    """finish() right after accept_channel must wait for that channel's data, not take a
    registered-but-not-started thread for an ended one (regression: the receiver hashed an
    incomplete block and reported a digest mismatch). A slow thread start opens the window."""
    start = threading.Thread.start

    def slow_start(self: threading.Thread) -> None:
        if self.name.startswith("multifd-recv-"):
            time.sleep(0.3)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    block = RamBlock.zeros("ram", 4 * PS)
    rx = Receiver(default_registry().create("none"), channels=1, timeout=10)
    rx.set_blocks([block])
    a, b = socket.socketpair()
    a.sendall(wire.encode_init(bytes(16), 0) + _data_packet([PS], 1) + b"\x42" * PS)
    a.close()
    seen: list[int] = []  # the page as finish() leaves it: it must be complete then

    def finish() -> None:
        rx.finish()
        seen.append(int(block.pages[1][0]))

    waiter = threading.Thread(target=finish, daemon=True)
    waiter.start()
    rx.accept_channel(b)
    waiter.join(10)
    assert seen == [0x42]
