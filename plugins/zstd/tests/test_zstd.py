"""The zstd method plugin (multifd-zstd): QEMU 10.0's zstd payload, one frame per channel."""

from __future__ import annotations

import numpy as np
import pytest
import streamkit
from pluginkit import import_plugin
from streamkit import PAGE, StreamConformance, packets

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError

zstandard, MAX_WINDOW, Zstd = import_plugin("zstd", "zstandard", "multifd_zstd:MAX_WINDOW",
                                            "multifd_zstd:Zstd", what="multifd-zstd or zstandard")
method = streamkit.level_factory(Zstd)
MAGIC = bytes.fromhex("28b52ffd")


def peer_stream(level: int = 1) -> zstandard.ZstdCompressionObj:
    """A compressor as QEMU sets one up: no checksum, no content size."""
    return zstandard.ZstdCompressor(level=level, write_checksum=False,
                                    write_content_size=False).compressobj()


class TestZstdConformance(StreamConformance):
    method_cls = Zstd
    plugin, other_plugin, registry_code = "zstd", "zlib", 0x04
    level_range, bad_levels = (0, 20, 1), (-1, 21, 22)
    corrupt_error = (r"multifd 0: decompressStream returned Data corruption detected "
                     r"\(packet 2\)")
    worst_levels = (0, 1, 20)
    worst_bound = 526336  # QEMU's sender buffer, ZSTD_compressBound(512 KiB)
    # 100 MiB of zeros in a few KB: refused at the first output chunk.
    bomb = """
        import zstandard
        peer = zstandard.ZstdCompressor(level=1).compressobj()
        chunk = bytes(1 << 20)
        bomb = b"".join(peer.compress(chunk) for _ in range(100))
        bomb += peer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    """


# ---------------------------------------------------------------------- the stream

def test_channel_bytes_are_one_standard_zstd_frame() -> None:
    """A plain streaming decompressor fed one channel's payloads in order yields its pages,
    packet by packet (each payload ends on a flushed block), and the frame never ends."""
    streamkit.assert_one_channel_stream(method(), zstandard.ZstdDecompressor().decompressobj(),
                                        "the frame must never be ended")


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

def test_window_larger_than_qemus_level_20_is_refused() -> None:
    pages = packets(1, seed=9)[0]
    peer = peer_stream(22)  # windowLog 27 > 25
    payload = peer.compress(pages.tobytes()) + peer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert MAX_WINDOW == 1 << zstandard.ZstdCompressionParameters.from_level(20).window_log
    with MethodHarness(method()) as h, pytest.raises(MethodError, match="too much memory"):
        h.decode(payload, len(pages))
    with MethodHarness(method(20)) as h:  # QEMU's highest level still decodes
        assert np.array_equal(h.roundtrip(pages), pages)


def test_small_overflow_does_not_leak_native_memory() -> None:
    """A payload that decodes to a little more than its packet is refused every time, and
    refusing it costs no memory (python-zstandard leaks its buffer when the sink raises, so
    the sink only flags a small overflow: 3000 refusals grew RSS by about 600 MiB before)."""
    import resource

    from multifd_core.methods.registry import default_registry

    h = MethodHarness(default_registry().create("zstd"))
    payload = h.encode(np.full((3, PAGE), 7, dtype=np.uint8))  # 3 pages, declared as 2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3000):
        h.reset_receiver()
        with pytest.raises(MethodError, match="received more than 8192"):
            h.decode(payload, 2)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"RSS grew {grown_mib:.0f} MiB over 3000 refused payloads"


# ---------------------------------------------------------------------- the library

def test_engine_reports_the_library() -> None:
    (engine,) = Zstd.engines()
    assert engine.available and engine.library == "zstd"
    assert engine.library_version == ".".join(map(str, zstandard.ZSTD_VERSION))


# ---------------------------------------------------------------------- end to end

@pytest.mark.parametrize(("channels", "level"), [(1, 1), (2, 3), (8, 1)])
def test_loopback_migration_rounds(channels: int, level: int) -> None:
    streamkit.assert_loopback_rounds("zstd", channels, level)
