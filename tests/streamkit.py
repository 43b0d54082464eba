"""Tests shared by QEMU's stream-per-channel methods (zlib, zstd): one compression stream per
channel for the whole session, flushed at the end of every packet.

Nothing here imports a plugin: the test module passes its method class in (``StreamConformance``
subclass, ``level_factory``) or names the method (``assert_loopback_rounds``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
from bombkit import assert_bomb_refused

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError, MultiFDError, UnknownMethodError
from multifd_core.methods.method import Method, MethodOptions
from multifd_core.methods.registry import MethodRegistry
from multifd_core.testing import MethodConformance, make_pages, mixed_pages, require

PAGE = 4096


def level_factory(cls: type[Method]) -> Callable[..., Any]:
    """``method(level=None)``: a new ``cls`` for 4 KiB pages at ``level``."""

    def method(level: int | None = None) -> Any:
        return cls(MethodOptions(page_size=PAGE, level=level))

    return method


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


def need_entry_point(plugin: str) -> None:
    """Skip (fail in CI) unless the registry lists ``plugin`` from its entry point."""
    require(plugin in MethodRegistry(), f"multifd-{plugin} has no entry point here: "
                                        f"pip install -e plugins/{plugin}")


def assert_one_channel_stream(method: Method, plain: Any, never_ended: str,
                              flush_tail: bytes = b"") -> None:
    """The plain streaming decompressor ``plain``, fed one channel's payloads in order, yields
    its pages packet by packet and never sees the stream end (``never_ended`` says so). With
    ``flush_tail``, every payload ends with it."""
    sent = packets(25, seed=2)
    with MethodHarness(method, channels=2) as h:
        payloads = [h.encode(pages, 1) for pages in sent]
    for payload, pages in zip(payloads, sent, strict=True):
        assert plain.decompress(payload) == pages.tobytes()
        if flush_tail:
            assert payload.endswith(flush_tail), "a packet must end with a sync flush"
    assert not plain.eof, never_ended


def assert_loopback_rounds(plugin: str, channels: int, level: int) -> None:
    """A native session over loopback TCP: a full round, then rounds of re-dirtied pages."""
    from multifd_core import loopback
    from multifd_core.engine.ram import RamBlock

    need_entry_point(plugin)
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

    dest, stats = loopback.migrate(blocks, method=plugin, channels=channels, level=level,
                                   rounds=rounds, before_round=before_round)
    for src, dst in zip(blocks, dest, strict=True):
        assert np.array_equal(dst.array, src.array), f"block {src.name} differs"
    assert stats.method == plugin and stats.rounds == 4
    assert len(stats.packets_per_channel) == channels
    assert stats.compression_ratio > 1.2


class StreamConformance(MethodConformance):
    """``MethodConformance`` plus what the stream-per-channel methods share. Set, besides
    ``method_cls``:

    ``plugin``         the method's name, also its distribution's (``multifd-<plugin>``)
    ``registry_code``  the flag code its registry entry must carry
    ``level_range``    (lowest, highest, default) level, as the out-of-range error states them
    ``bad_levels``     levels that error names
    ``corrupt_error``  what decoding 64 bytes of 0xff after a good packet must raise (a pattern)
    ``worst_levels``   levels whose worst packet (128 random pages) must fit ``worst_bound``
    ``worst_bound``    QEMU's sender buffer in bytes
    ``bomb``           code that sets ``bomb`` (see ``bombkit.assert_bomb_refused``)
    ``other_plugin``   another method, to exclude this one with ``MULTIFD_PLUGINS``
    """

    stateful = True
    plugin: ClassVar[str]
    registry_code: ClassVar[int]
    level_range: ClassVar[tuple[int, int, int]]
    bad_levels: ClassVar[tuple[int, ...]]
    corrupt_error: ClassVar[str]
    worst_levels: ClassVar[tuple[int, ...]]
    worst_bound: ClassVar[int]
    bomb: ClassVar[str]
    other_plugin: ClassVar[str]

    def _stream_primed(self) -> tuple[MethodHarness, np.ndarray]:
        """A harness past one good packet, and the next packet's pages."""
        h = MethodHarness(self.method())
        first = packets(1, seed=6)[0]
        h.decode(h.encode(first), len(first))
        return h, packets(1, seed=7)[0]

    # -------------------------------------------------------------- the stream

    def test_roundtrip_many_packets_several_channels(self) -> None:
        channels = 3
        sent: list[list[tuple[bytes, np.ndarray]]] = [[] for _ in range(channels)]
        with MethodHarness(self.method(), channels=channels) as h:
            for i, pages in enumerate(packets(60, seed=1)):
                sent[i % channels].append((h.encode(pages, i % channels), pages))
            for ch in range(channels):
                for payload, pages in sent[ch]:
                    assert np.array_equal(h.decode(payload, len(pages), ch), pages)

    # -------------------------------------------------------------- refusals

    def test_corrupt_payload_names_the_codec_error(self) -> None:
        h, pages = self._stream_primed()
        with h, pytest.raises(MethodError, match=self.corrupt_error):
            h.decode(b"\xff" * 64, len(pages))  # block type 3: none in deflate, reserved in zstd

    def test_truncated_payload_names_sizes(self) -> None:
        h, pages = self._stream_primed()
        with h:
            good = h.encode(pages)
            with pytest.raises(MethodError, match=r"multifd 0: packet size received \d+ size "
                                                  rf"expected {len(pages) * PAGE}") as err:
                h.decode(good[: len(good) // 2], len(pages))
        assert err.value.received < len(pages) * PAGE
        assert err.value.expected == len(pages) * PAGE

    @pytest.mark.parametrize("declared", [1, 2, 5])
    def test_payload_decoding_to_more_or_less_is_refused(self, declared: int) -> None:
        pages = make_pages("text", 3, PAGE, np.random.default_rng(8))
        with MethodHarness(self.method()) as h:
            payload = h.encode(pages)
            expected = declared * PAGE
            text = "more than " if declared < 3 else ""
            with pytest.raises(MethodError, match=rf"packet size received {text}\d+ size "
                                                  rf"expected {expected} \(packet 1\)") as err:
                h.decode(payload, declared)
        assert err.value.channel == 0
        assert err.value.expected == expected

    def test_oversized_payload_is_refused_before_decoding(self) -> None:
        with MethodHarness(self.method()) as h, \
                pytest.raises(MethodError, match="unexpectedly large"):
            h.decode(bytes((1 << 20) + 1), 128)

    def test_worst_case_packet_fits_the_receive_buffer(self) -> None:
        pages = make_pages("random", 128, PAGE, np.random.default_rng(11))
        for level in self.worst_levels:
            with MethodHarness(self.method(level=level)) as h:
                payload = h.encode(pages)
                assert len(payload) <= self.worst_bound
                assert np.array_equal(h.decode(payload, 128), pages)

    def test_decompression_bomb_is_refused_with_bounded_memory(self) -> None:
        """100 MiB of zeros in a small payload: refused, peak RSS flat."""
        assert_bomb_refused(self.plugin, self.bomb)

    # -------------------------------------------------------------- levels, registry

    def test_level_default_range_and_refusals(self) -> None:
        low, high, default = self.level_range
        assert self.method().level == default
        assert self.method(level=low).level == low and self.method(level=high).level == high
        for bad in self.bad_levels:
            with pytest.raises(MultiFDError, match=rf"level {bad} is out of range for method "
                                                   rf"{self.plugin}: valid levels are {low} to "
                                                   rf"{high} \(default {default}\)"):
                self.method(level=bad)

    def test_registry_lists_the_method_from_its_distribution(self) -> None:
        registry = MethodRegistry()
        need_entry_point(self.plugin)
        entry = registry.get(self.plugin)
        assert (entry.cls, entry.code, entry.distribution) == (
            self.method_cls, self.registry_code, f"multifd-{self.plugin}")

    def test_missing_plugin_message_names_the_distribution(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        name, other = self.plugin, self.other_plugin
        with pytest.raises(UnknownMethodError,
                           match=f"install it with: pip install multifd-{name}"):
            MethodRegistry(entry_points=False).get(name)
        monkeypatch.setenv("MULTIFD_PLUGINS", other)
        registry = MethodRegistry()
        assert name not in registry
        with pytest.raises(UnknownMethodError, match=rf"'{name}' \(multifd-{name}\) is installed "
                                                     rf"but excluded by MULTIFD_PLUGINS='{other}'"):
            registry.get(name)
