"""The zstd method plugin (multifd-zstd): QEMU 10.0's zstd payload, one frame per channel."""

from __future__ import annotations

import numpy as np
import pytest
from bombkit import assert_bomb_refused

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError, MultiFDError, UnknownMethodError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry
from multifd_core.testing import MethodConformance, in_ci, make_pages, mixed_pages, require

try:
    import zstandard

    from multifd_zstd import MAX_WINDOW, Zstd
except ImportError:  # pragma: no cover - depends on the environment
    if in_ci():
        raise
    pytest.skip("multifd-zstd or zstandard is not installed: pip install -e plugins/zstd",
                allow_module_level=True)

PAGE = 4096
MAGIC = bytes.fromhex("28b52ffd")


def method(level: int | None = None) -> Zstd:
    return Zstd(MethodOptions(page_size=PAGE, level=level))


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


def peer_stream(level: int = 1) -> zstandard.ZstdCompressionObj:
    """A compressor as QEMU sets one up: no checksum, no content size."""
    return zstandard.ZstdCompressor(level=level, write_checksum=False,
                                    write_content_size=False).compressobj()


class TestZstdConformance(MethodConformance):
    method_cls = Zstd
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


def test_channel_bytes_are_one_standard_zstd_frame() -> None:
    """A plain streaming decompressor fed one channel's payloads in order yields its pages,
    packet by packet (each payload ends on a flushed block), and the frame never ends."""
    sent = packets(25, seed=2)
    with MethodHarness(method(), channels=2) as h:
        payloads = [h.encode(pages, 1) for pages in sent]
    plain = zstandard.ZstdDecompressor().decompressobj()
    for payload, pages in zip(payloads, sent, strict=True):
        assert plain.decompress(payload) == pages.tobytes()
    assert not plain.eof, "the frame must never be ended"


def test_frame_header_only_in_first_payload() -> None:
    with MethodHarness(method()) as h:
        payloads = [h.encode(pages) for pages in packets(4, seed=3)]
    assert payloads[0][:4] == MAGIC
    # Frame header descriptor: no content size, not single-segment, no checksum, no dict id.
    assert payloads[0][4] == 0x00
    assert not any(p.startswith(MAGIC) for p in payloads[1:])


def test_level_0_is_zstds_default_level_3() -> None:
    pages = packets(1, seed=4)[0]
    outputs = {}
    for level in (0, 1, 3):
        with MethodHarness(method(level)) as h:
            outputs[level] = h.encode(pages)
            assert np.array_equal(h.decode(outputs[level], len(pages)), pages)
    assert outputs[0] == outputs[3] != outputs[1]


def test_new_frame_at_packet_boundary_is_accepted_like_qemu() -> None:
    """QEMU's DStream starts a new frame after one ends; so does ours (never sent by us)."""
    sent = packets(2, seed=5)
    first_peer, second_peer = peer_stream(), peer_stream()
    first = first_peer.compress(sent[0].tobytes()) + first_peer.flush(
        zstandard.COMPRESSOBJ_FLUSH_FINISH)
    second = second_peer.compress(sent[1].tobytes()) + second_peer.flush(
        zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with MethodHarness(method()) as h:
        for payload, pages in ((first, sent[0]), (second, sent[1])):
            assert np.array_equal(h.decode(payload, len(pages)), pages)


# ---------------------------------------------------------------------- refusals

def _primed() -> tuple[MethodHarness, np.ndarray]:
    h = MethodHarness(method())
    first = packets(1, seed=6)[0]
    h.decode(h.encode(first), len(first))
    return h, packets(1, seed=7)[0]


def test_corrupt_payload_names_zstd_error() -> None:
    h, pages = _primed()
    with h, pytest.raises(MethodError, match=r"multifd 0: decompressStream returned Data "
                                             r"corruption detected \(packet 2\)"):
        h.decode(b"\xff" * 64, len(pages))  # block type 3 is reserved


def test_truncated_payload_names_sizes() -> None:
    h, pages = _primed()
    with h:
        good = h.encode(pages)
        with pytest.raises(MethodError, match=r"multifd 0: packet size received \d+ size "
                                              rf"expected {len(pages) * PAGE}") as err:
            h.decode(good[: len(good) // 2], len(pages))
    assert err.value.received < len(pages) * PAGE


@pytest.mark.parametrize("declared", [1, 2, 5])
def test_payload_decoding_to_more_or_less_is_refused(declared: int) -> None:
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


def test_window_larger_than_qemus_level_20_is_refused() -> None:
    pages = packets(1, seed=9)[0]
    peer = peer_stream(22)  # windowLog 27 > 25
    payload = peer.compress(pages.tobytes()) + peer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert MAX_WINDOW == 1 << zstandard.ZstdCompressionParameters.from_level(20).window_log
    with MethodHarness(method()) as h, pytest.raises(MethodError, match="too much memory"):
        h.decode(payload, len(pages))
    with MethodHarness(method(20)) as h:  # QEMU's highest level still decodes
        assert np.array_equal(h.roundtrip(pages), pages)


def test_oversized_payload_is_refused_before_decoding() -> None:
    with MethodHarness(method()) as h, pytest.raises(MethodError, match="unexpectedly large"):
        h.decode(bytes((1 << 20) + 1), 128)


def test_worst_case_packet_fits_the_receive_buffer() -> None:
    pages = make_pages("random", 128, PAGE, np.random.default_rng(10))
    for level in (0, 1, 20):
        with MethodHarness(method(level)) as h:
            payload = h.encode(pages)
            assert len(payload) <= 526336  # QEMU's sender buffer, ZSTD_compressBound(512 KiB)
            assert np.array_equal(h.decode(payload, 128), pages)


BOMB = """
    import zstandard
    peer = zstandard.ZstdCompressor(level=1).compressobj()
    chunk = bytes(1 << 20)
    bomb = b"".join(peer.compress(chunk) for _ in range(100))
    bomb += peer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
"""


def test_decompression_bomb_is_refused_with_bounded_memory() -> None:
    """100 MiB of zeros in a few KB: refused at the first output chunk, peak RSS flat."""
    assert_bomb_refused("zstd", BOMB)


# ---------------------------------------------------------------------- levels, registry

def test_levels() -> None:
    assert method().level == 1
    assert method(0).level == 0 and method(20).level == 20
    for bad in (-1, 21, 22):
        with pytest.raises(MultiFDError, match=rf"level {bad} is out of range for method zstd: "
                                               r"valid levels are 0 to 20 \(default 1\)"):
            method(bad)


def test_engine_reports_the_library() -> None:
    (engine,) = Zstd.engines()
    assert engine.available and engine.library == "zstd"
    assert engine.library_version == ".".join(map(str, zstandard.ZSTD_VERSION))


def test_registry_lists_zstd_from_its_distribution() -> None:
    registry = MethodRegistry()
    require("zstd" in registry, "multifd-zstd has no entry point here: "
                                "pip install -e plugins/zstd")
    entry = registry.get("zstd")
    assert (entry.cls, entry.code, entry.distribution) == (Zstd, 0x04, "multifd-zstd")


def test_missing_plugin_message_names_the_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownMethodError, match="install it with: pip install multifd-zstd"):
        MethodRegistry(entry_points=False).get("zstd")
    monkeypatch.setenv("MULTIFD_PLUGINS", "zlib")
    registry = MethodRegistry()
    assert "zstd" not in registry
    with pytest.raises(UnknownMethodError, match=r"'zstd' \(multifd-zstd\) is installed but "
                                                 r"excluded by MULTIFD_PLUGINS='zlib'"):
        registry.get("zstd")


# ---------------------------------------------------------------------- end to end

@pytest.mark.parametrize(("channels", "level"), [(1, 1), (2, 3), (8, 1)])
def test_loopback_migration_rounds(channels: int, level: int) -> None:
    """A native session over loopback TCP: a full round, then rounds of re-dirtied pages."""
    loopback = pytest.importorskip("multifd_core.loopback",
                                   reason="multifd_core.loopback is not written yet")
    from multifd_core.engine.ram import RamBlock

    require("zstd" in MethodRegistry(), "multifd-zstd has no entry point here: "
                                        "pip install -e plugins/zstd")
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

    dest, stats = loopback.migrate(blocks, method="zstd", channels=channels, level=level,
                                   rounds=rounds, before_round=before_round)
    for src, dst in zip(blocks, dest, strict=True):
        assert np.array_equal(dst.array, src.array), f"block {src.name} differs"
    assert stats.method == "zstd" and stats.rounds == 4
    assert len(stats.packets_per_channel) == channels
    assert stats.compression_ratio > 1.2


def test_small_overflow_does_not_leak_native_memory() -> None:
    """A payload that decodes to a little more than its packet is refused every time, and
    refusing it costs no memory (python-zstandard leaks its buffer when the sink raises, so
    the sink only flags a small overflow: 3000 refusals grew RSS by about 600 MiB before)."""
    import resource

    import numpy as np

    from multifd_core.engine.harness import MethodHarness
    from multifd_core.errors import MethodError
    from multifd_core.methods.registry import default_registry

    h = MethodHarness(default_registry().create("zstd"))
    payload = h.encode(np.full((3, 4096), 7, dtype=np.uint8))  # 3 pages, declared as 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3000):
        h.reset_receiver()
        with pytest.raises(MethodError, match="received more than 8192"):
            h.decode(payload, 2)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB over 3000 refused payloads"
