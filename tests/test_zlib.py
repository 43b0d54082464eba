"""The zlib method plugin (multifd-zlib): QEMU 10.0's zlib payload, one stream per channel."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from bombkit import assert_bomb_refused

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError, MultiFDError, UnknownMethodError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry
from multifd_core.testing import MethodConformance, in_ci, make_pages, mixed_pages, require

try:
    from multifd_zlib import Zlib
except ImportError:  # pragma: no cover - depends on the environment
    if in_ci():
        raise
    pytest.skip("multifd-zlib is not installed: pip install -e plugins/zlib",
                allow_module_level=True)

PAGE = 4096


def method(level: int | None = None) -> Zlib:
    return Zlib(MethodOptions(page_size=PAGE, level=level))


def packets(count: int, seed: int) -> list[np.ndarray]:
    """Packets of 1..128 pages mixing zero, text-like and random pages."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(1, 129))
        kinds = ("zero", "text", "random")
        pages = np.concatenate([make_pages(kinds[i % 3], 1, PAGE, rng) for i in range(n)])
        out.append(pages[rng.permutation(n)])
    return out


class TestZlibConformance(MethodConformance):
    method_cls = Zlib
    stateful = True


# ---------------------------------------------------------------------- the stream

def test_roundtrip_many_packets_several_channels() -> None:
    channels = 3
    sent: list[list[tuple[bytes, np.ndarray]]] = [[] for _ in range(channels)]
    with MethodHarness(method(), channels=channels) as h:
        for i, pages in enumerate(packets(60, seed=1)):
            sent[i % channels].append((h.encode(pages, i % channels), pages))
        for ch in range(channels):
            for payload, pages in sent[ch]:
                assert np.array_equal(h.decode(payload, len(pages), ch), pages)


def test_channel_bytes_are_one_standard_zlib_stream() -> None:
    """A plain zlib.decompressobj fed one channel's payloads in order yields its pages."""
    sent = packets(25, seed=2)
    with MethodHarness(method(), channels=2) as h:
        payloads = [h.encode(pages, 1) for pages in sent]
    plain = zlib.decompressobj()
    for payload, pages in zip(payloads, sent, strict=True):
        assert plain.decompress(payload) == pages.tobytes()
        assert payload.endswith(b"\x00\x00\xff\xff"), "a packet must end with a sync flush"
    assert not plain.eof, "the stream must never be finished"


def test_header_only_in_first_payload() -> None:
    sent = packets(4, seed=3)
    with MethodHarness(method(1)) as h:
        payloads = [h.encode(pages) for pages in sent]
    assert payloads[0][:2] == b"\x78\x01"
    for later in payloads[1:]:
        with pytest.raises(zlib.error, match="incorrect header check"):
            zlib.decompressobj().decompress(later)


@pytest.mark.parametrize(("level", "header"), [(0, "7801"), (1, "7801"), (2, "785e"),
                                               (5, "785e"), (6, "789c"), (7, "78da"),
                                               (9, "78da")])
def test_header_per_level(level: int, header: str) -> None:
    pages = packets(1, seed=4)[0]
    with MethodHarness(method(level)) as h:
        payload = h.encode(pages)
        assert payload[:2].hex() == header
        assert np.array_equal(h.decode(payload, len(pages)), pages)


def test_one_codec_call_per_packet_sees_gathered_pages() -> None:
    """Pages that are not adjacent in the block still form one contiguous input."""
    pages = packets(1, seed=5)[0]
    with MethodHarness(method()) as h:
        payload = h.encode(pages[::-1].copy())
    assert zlib.decompressobj().decompress(payload) == pages[::-1].tobytes()


# ---------------------------------------------------------------------- refusals

def _primed(level: int = 1) -> tuple[MethodHarness, np.ndarray]:
    h = MethodHarness(method(level))
    first = packets(1, seed=6)[0]
    h.decode(h.encode(first), len(first))
    return h, packets(1, seed=7)[0]


def test_corrupt_payload_names_inflate_error() -> None:
    h, pages = _primed()
    with h, pytest.raises(MethodError, match=r"multifd 0: inflate returned -3 instead of Z_OK"):
        h.decode(b"\xff" * 64, len(pages))  # block type 3 does not exist


def test_truncated_payload_names_sizes() -> None:
    h, pages = _primed()
    with h:
        good = h.encode(pages)
        with pytest.raises(MethodError, match=r"multifd 0: packet size received \d+ size "
                                              rf"expected {len(pages) * PAGE}") as err:
            h.decode(good[: len(good) // 2], len(pages))
    assert err.value.received < len(pages) * PAGE
    assert err.value.expected == len(pages) * PAGE


@pytest.mark.parametrize("declared", [1, 2, 5])
def test_payload_inflating_to_more_or_less_is_refused(declared: int) -> None:
    pages = make_pages("text", 3, PAGE, np.random.default_rng(8))
    with MethodHarness(method()) as h:
        payload = h.encode(pages)
        expected = declared * PAGE
        text = "more than " if declared < 3 else ""
        with pytest.raises(MethodError, match=rf"packet size received {text}\d+ size expected "
                                              rf"{expected} \(packet 1\)") as err:
            h.decode(payload, declared)
    assert err.value.channel == 0
    assert err.value.expected == expected


def test_stream_end_from_peer_is_refused() -> None:
    """A peer that finishes its stream (Z_FINISH) gets QEMU's inflate error."""
    sent = packets(2, seed=9)
    peer = zlib.compressobj(1, zlib.DEFLATED, 15, 8)
    first = peer.compress(sent[0].tobytes()) + peer.flush(zlib.Z_SYNC_FLUSH)
    second = peer.compress(sent[1].tobytes()) + peer.flush(zlib.Z_FINISH)
    with MethodHarness(method()) as h:
        assert np.array_equal(h.decode(first, len(sent[0])), sent[0])
        with pytest.raises(MethodError, match="inflate returned 1 instead of Z_OK"):
            h.decode(second, len(sent[1]))


def test_fresh_header_in_later_packet_is_refused() -> None:
    """A peer that restarts its stream mid-channel sends a header QEMU cannot inflate."""
    sent = packets(2, seed=10)
    with MethodHarness(method()) as h:
        h.decode(h.encode(sent[0]), len(sent[0]))
        restarted = zlib.compressobj(1, zlib.DEFLATED, 15, 8)
        payload = restarted.compress(sent[1].tobytes()) + restarted.flush(zlib.Z_SYNC_FLUSH)
        assert payload[:2] == b"\x78\x01"
        with pytest.raises(MethodError, match=r"inflate returned -3 instead of Z_OK"):
            h.decode(payload, len(sent[1]))


def test_oversized_payload_is_refused_before_decoding() -> None:
    with MethodHarness(method()) as h, pytest.raises(MethodError, match="unexpectedly large"):
        h.decode(bytes((1 << 20) + 1), 128)


def test_max_payload_is_qemus_receive_buffer() -> None:
    assert method().max_payload(128) == 1 << 20
    assert method().max_payload(0) == 0


def test_worst_case_packet_fits_the_receive_buffer() -> None:
    pages = make_pages("random", 128, PAGE, np.random.default_rng(11))
    for level in (0, 1, 9):
        with MethodHarness(method(level)) as h:
            payload = h.encode(pages)
            assert len(payload) <= 524461  # QEMU's sender buffer, compressBound(512 KiB)
            assert np.array_equal(h.decode(payload, 128), pages)


BOMB = """
    import zlib
    peer = zlib.compressobj(9, zlib.DEFLATED, 15, 8)
    chunk = bytes(1 << 20)
    bomb = b"".join(peer.compress(chunk) for _ in range(100)) + peer.flush(zlib.Z_SYNC_FLUSH)
"""


def test_decompression_bomb_is_refused_with_bounded_memory() -> None:
    """100 MiB of zeros in ~100 KB: refused after one byte past the packet, peak RSS flat."""
    assert_bomb_refused("zlib", BOMB)


# ---------------------------------------------------------------------- levels, registry

def test_levels() -> None:
    assert method().level == 1
    assert method(0).level == 0 and method(9).level == 9
    for bad in (-1, 10):
        with pytest.raises(MultiFDError, match=rf"level {bad} is out of range for method zlib: "
                                               r"valid levels are 0 to 9 \(default 1\)"):
            method(bad)


def test_registry_lists_zlib_from_its_distribution() -> None:
    registry = MethodRegistry()
    require("zlib" in registry, "multifd-zlib has no entry point here: "
                                "pip install -e plugins/zlib")
    entry = registry.get("zlib")
    assert (entry.cls, entry.code, entry.distribution) == (Zlib, 0x02, "multifd-zlib")


def test_missing_plugin_message_names_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownMethodError, match="pip install multifd-zlib"):
        MethodRegistry(entry_points=False).get("zlib")
    monkeypatch.setenv("MULTIFD_PLUGINS", "zstd")
    assert "zlib" not in MethodRegistry()


# ---------------------------------------------------------------------- end to end

@pytest.mark.parametrize(("channels", "level"), [(1, 1), (2, 6), (8, 1)])
def test_loopback_migration_rounds(channels: int, level: int) -> None:
    """A native session over loopback TCP: a full round, then rounds of re-dirtied pages."""
    loopback = pytest.importorskip("multifd_core.loopback",
                                   reason="multifd_core.loopback is not written yet")
    from multifd_core.engine.ram import RamBlock

    require("zlib" in MethodRegistry(), "multifd-zlib has no entry point here: "
                                        "pip install -e plugins/zlib")
    rng = np.random.default_rng(12)
    blocks = [RamBlock.zeros("pc.ram", 1000 * PAGE), RamBlock.zeros("vga.vram", 40 * PAGE)]
    for b in blocks:
        b.array[:] = mixed_pages(b.n_pages, PAGE, rng).reshape(-1)
    dirty = [{b.name: np.unique(rng.integers(0, b.n_pages, b.n_pages // 5)) for b in blocks}
             for _ in range(3)]
    rounds = [dict.fromkeys(b.name for b in blocks), *dirty]

    def before_round(i: int) -> None:
        for b in blocks if i else ():
            idx = rounds[i][b.name]
            b.pages[idx] = mixed_pages(len(idx), PAGE, rng)

    dest, stats = loopback.migrate(blocks, method="zlib", channels=channels, level=level,
                                   rounds=rounds, before_round=before_round)
    for src, dst in zip(blocks, dest, strict=True):
        assert np.array_equal(dst.array, src.array), f"block {src.name} differs"
    assert stats.method == "zlib" and stats.rounds == 4
    assert len(stats.packets_per_channel) == channels
    assert stats.compression_ratio > 1.2
