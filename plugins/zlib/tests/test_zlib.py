"""The zlib method plugin (multifd-zlib): QEMU 10.0's zlib payload, one stream per channel."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import streamkit
from pluginkit import import_plugin
from streamkit import StreamConformance, packets

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError

(Zlib,) = import_plugin("zlib", "multifd_zlib:Zlib")
method = streamkit.level_factory(Zlib)


class TestZlibConformance(StreamConformance):
    method_cls = Zlib
    plugin, other_plugin, registry_code = "zlib", "zstd", 0x02
    level_range, bad_levels = (0, 9, 1), (-1, 10)
    corrupt_error = r"multifd 0: inflate returned -3 instead of Z_OK"
    worst_levels = (0, 1, 9)
    worst_bound = 524461  # QEMU's sender buffer, compressBound(512 KiB)
    # 100 MiB of zeros in ~100 KB: refused after one byte past the packet.
    bomb = """
        import zlib
        peer = zlib.compressobj(9, zlib.DEFLATED, 15, 8)
        chunk = bytes(1 << 20)
        bomb = b"".join(peer.compress(chunk) for _ in range(100)) + peer.flush(zlib.Z_SYNC_FLUSH)
    """


# ---------------------------------------------------------------------- the stream

def test_channel_bytes_are_one_standard_zlib_stream() -> None:
    """A plain zlib.decompressobj fed one channel's payloads in order yields its pages."""
    never_ended = "the stream must never be finished"
    streamkit.assert_one_channel_stream(method(), zlib.decompressobj(), never_ended,
                                        flush_tail=b"\x00\x00\xff\xff")


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


def test_max_payload_is_qemus_receive_buffer() -> None:
    assert method().max_payload(128) == 1 << 20
    assert method().max_payload(0) == 0


# ---------------------------------------------------------------------- end to end

@pytest.mark.parametrize(("channels", "level"), [(1, 1), (2, 6), (8, 1)])
def test_loopback_migration_rounds(channels: int, level: int) -> None:
    streamkit.assert_loopback_rounds("zlib", channels, level)
