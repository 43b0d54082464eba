"""The conformance kit for method plugins: subclass ``MethodConformance`` in a test module.

::

    from multifd_core.testing import MethodConformance
    from multifd_lz4 import Lz4

    class TestLz4Conformance(MethodConformance):
        method_cls = Lz4
        stateful = True          # packets of a channel form one stream

pytest collects the inherited ``test_*`` methods. They drive the method's own hooks through
``MethodHarness`` (no sockets), then run one native migration over loopback TCP. Set the class
attributes below to describe the method; every check failure names what was expected.
"""

from __future__ import annotations

import glob
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import pytest

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError, MultiFDError
from multifd_core.gilcheck import (
    GilCheckUnavailable,
    GilVerdict,
    gil_runnable,
    gil_verdict,
)
from multifd_core.layout import (
    LayoutMismatch,
    LayoutProbeUnavailable,
    check_struct_layout,
    struct_layout_report,
)
from multifd_core.methods.method import EngineInfo, Method, MethodOptions
from multifd_core.methods.registry import MethodRegistry, check_method_class
from multifd_core.pagekinds import KINDS, make_pages, mixed_pages
from multifd_core.wire import page_count

__all__ = [
    "KINDS", "GilCheckUnavailable", "GilVerdict", "LayoutMismatch", "LayoutProbeUnavailable",
    "MethodConformance", "assert_struct_layout",
    "check_struct_layout", "gil_runnable", "gil_verdict", "in_ci", "make_pages",
    "mixed_pages", "require", "struct_layout_report", "system_zlib", "wait_until",
]


def in_ci() -> bool:
    """``CI`` is set (and not ``0``/``false``): a missing dependency fails instead of skipping."""
    return os.environ.get("CI", "") not in ("", "0", "false")


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false; in CI (``CI`` set) fail instead."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``condition`` until it is true (returned); fail naming ``what`` after
    ``timeout`` s. For tests that must wait for a state: never sleep, then assert it."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return value


def system_zlib() -> str:
    """The system's libz.so.1: a real library that is not the one a binding wants, for
    tests of a binding pointed at the wrong library."""
    paths = glob.glob("/lib/*/libz.so.1") + glob.glob("/usr/lib/*/libz.so.1")
    require(bool(paths), "no libz.so.1 to stand in for a wrong library: install zlib1g")
    return paths[0]


# ---------------------------------------------------------------------- the suite

class MethodConformance:
    """Inherit in a ``Test*`` class and set ``method_cls``; pytest runs the checks below.

    ``options``          extra ``MethodOptions`` keywords for every method instance.
    ``stateful``         True when a channel's packets form one stream (packet k+1 needs k).
    ``releases_gil``     False only for a method whose codec holds the GIL; then set
                         ``gil_reason``: the GIL check becomes an xfail showing it.
    ``gil_min_runnable`` share of a window two busy channel threads must be runnable (running,
                         or queued for a CPU; not asleep on the GIL), both making progress, for
                         the window to vote "parallel". Default 0.9. See
                         ``multifd_core.gilcheck``.
    ``channels``, ``rounds``, ``packets``: the shape of the round-trip test.
    """

    method_cls: ClassVar[type[Method]]
    options: ClassVar[dict[str, Any]] = {}
    page_size: ClassVar[int] = 4096
    stateful: ClassVar[bool] = False
    releases_gil: ClassVar[bool] = True
    gil_reason: ClassVar[str] = ""
    gil_min_runnable: ClassVar[float] = 0.9
    channels: ClassVar[int] = 3
    rounds: ClassVar[int] = 2
    packets: ClassVar[int] = 8
    seed: ClassVar[int] = 20250710

    # -------------------------------------------------------------- helpers

    def method(self, **overrides: Any) -> Method:
        opts = {"page_size": self.page_size, **self.options, **overrides}
        return self.method_cls(MethodOptions(**opts))

    def harness(self, channels: int = 1, send: Method | None = None,
                recv: Method | None = None) -> MethodHarness:
        return MethodHarness(send or self.method(), recv or self.method(), channels=channels)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + salt)

    def available_engines(self) -> list[EngineInfo]:
        return [e for e in self.method_cls.engines() if e.available]

    def assert_refused(self, decode: Callable[[], np.ndarray], what: str,
                       original: np.ndarray | None = None) -> None:
        """``decode()`` must raise MethodError, or (when ``original`` is given) return exactly it.

        Anything else (another exception, pages of the wrong shape, wrong pages passed as good
        when no original is allowed) fails with ``what`` in the message.
        """
        try:
            out = decode()
        except MethodError:
            return
        except Exception as exc:  # the point of the check: nothing but MethodError
            pytest.fail(f"{what}: raised {type(exc).__name__} ({exc}), expected MethodError")
        if original is None:
            pytest.fail(f"{what}: decoded without error, expected MethodError")
        assert out.shape == original.shape, f"{what}: decoded shape {out.shape}"
        if not np.array_equal(out, original):
            pytest.fail(f"{what}: decoded to wrong pages without an error, expected "
                        f"MethodError or the original pages")

    def good_packets(self, n: int, pages: int, salt: int = 0) -> list[np.ndarray]:
        rng = self.rng(salt)
        return [mixed_pages(pages, self.page_size, rng) for _ in range(n)]

    # -------------------------------------------------------------- declaration

    def test_declaration_is_valid(self) -> None:
        check_method_class(self.method_cls)
        assert self.method_cls.description, "set a one-line description"

    def test_engines_are_declared(self) -> None:
        engines = self.method_cls.engines()
        assert engines, "engines() returned no engine"
        names = [e.name for e in engines]
        assert len(set(names)) == len(names), f"engine names repeat: {names}"
        for e in engines:
            assert isinstance(e, EngineInfo), f"engines() item {e!r} is not an EngineInfo"
            assert e.kind in ("hardware", "software"), f"engine {e.name}: kind {e.kind!r}"
            assert isinstance(e.available, bool), f"engine {e.name}: available must be a bool"
            if not e.available:
                assert e.reason, f"engine {e.name} is unavailable and gives no reason"
        ok, reason = self.method_cls.available()
        assert ok == any(e.available for e in engines)
        assert ok or reason

    def test_unknown_or_unavailable_engine_is_refused(self) -> None:
        with pytest.raises(MultiFDError, match="no engine"):
            self.method(engine="no-such-engine")
        for e in self.method_cls.engines():
            if not e.available:
                with pytest.raises(MultiFDError, match="not available"):
                    self.method(engine=e.name)

    # -------------------------------------------------------------- round trips

    def test_roundtrip_channels_rounds_packets(self) -> None:
        """Mixed packets, interleaved on several channels over rounds, decoded per channel."""
        rng = self.rng(1)
        count = page_count(self.page_size)
        sizes = [max(1, min(k, count)) for k in (1, count, 2, 37, count - 1, 5, 64, 3)]
        ram = mixed_pages(count * 2, self.page_size, rng)
        sent: list[list[tuple[bytes, np.ndarray]]] = [[] for _ in range(self.channels)]
        with self.harness(self.channels) as h:
            for r in range(self.rounds):
                # each round dirties a tenth of the pages, like a live guest
                dirty = rng.integers(0, len(ram), len(ram) // 10)
                ram[dirty] = mixed_pages(len(dirty), self.page_size, rng)
                for p in range(self.packets):
                    ch = (p + r) % self.channels
                    n = sizes[p % len(sizes)]
                    start = int(rng.integers(0, len(ram) - n + 1))
                    pages = ram[start : start + n].copy()
                    before = pages.copy()
                    payload = h.encode(pages, ch)
                    assert np.array_equal(pages, before), "send_prepare changed the pages"
                    bound = h.recv_method.max_payload(n)
                    assert len(payload) <= bound, \
                        f"payload of {len(payload)} bytes for {n} pages > max_payload {bound}"
                    sent[ch].append((payload, pages))
            for ch in reversed(range(self.channels)):  # channels decode independently
                for i, (payload, pages) in enumerate(sent[ch]):
                    out = h.decode(payload, len(pages), ch)
                    assert out.shape == pages.shape
                    assert np.array_equal(out, pages), f"channel {ch} packet {i} differs"

    @pytest.mark.parametrize("kind", KINDS)
    def test_roundtrip_kind(self, kind: str) -> None:
        rng = self.rng(2)
        n = page_count(self.page_size)
        with self.harness() as h:
            for _ in range(3):
                pages = make_pages(kind, n, self.page_size, rng)
                assert np.array_equal(h.roundtrip(pages), pages)

    def test_levels(self) -> None:
        levels = self.method_cls.levels
        if levels is None:
            with pytest.raises(MultiFDError):
                self.method(level=1)
            return
        pages = self.good_packets(1, 16, salt=3)[0]
        for level in sorted({levels.minimum, levels.default, levels.maximum}):
            send = self.method(level=level)
            with self.harness(send=send, recv=self.method()) as h:
                assert np.array_equal(h.roundtrip(pages), pages), f"level {level}"
        with pytest.raises(MultiFDError):
            self.method(level=levels.maximum + 1)

    # -------------------------------------------------------------- stream state

    def test_stream_state(self) -> None:
        """A stateful method's packets depend on earlier ones on the same channel; a stateless
        method's packets decode in any order."""
        rng = self.rng(4)
        block = make_pages("random", 2, self.page_size, rng)
        packets = [block, block.copy(), make_pages("text", 2, self.page_size, rng), block]
        with self.harness() as h:
            payloads = [h.encode(p) for p in packets]
        if self.stateful:
            assert len(payloads[1]) < len(payloads[0]) // 2, (
                f"declared stateful, but a packet repeating the previous one did not shrink "
                f"({len(payloads[0])} then {len(payloads[1])} bytes)")
            with self.harness() as h:  # in order: decodes
                for payload, pages in zip(payloads, packets, strict=True):
                    assert np.array_equal(h.decode(payload, len(pages)), pages)
            with self.harness() as h:  # packet 1 before packet 0: refused
                self.assert_refused(lambda: h.decode(payloads[1], len(packets[1])),
                                    "packet 1 of a stateful stream decoded before packet 0")
        else:
            with self.harness() as h:
                for i in reversed(range(len(packets))):
                    out = h.decode(payloads[i], len(packets[i]))
                    assert np.array_equal(out, packets[i]), (
                        f"packet {i} decoded out of order differs: if the method keeps a "
                        f"stream per channel, set stateful = True")

    # -------------------------------------------------------------- engines

    def test_every_available_engine_and_cross_engine(self) -> None:
        engines = self.available_engines()
        assert engines, f"no engine available: {self.method_cls.available()[1]}"
        packets = self.good_packets(4, 24, salt=5)
        for a, b in itertools.product(engines, repeat=2):
            pair = f"encoded by engine {a.name}, decoded by engine {b.name}"
            send, recv = self.method(engine=a.name), self.method(engine=b.name)
            with self.harness(send=send, recv=recv) as h:
                for i, pages in enumerate(packets):
                    try:
                        out = h.roundtrip(pages)
                    except Exception as exc:  # reported with the pair that failed
                        pytest.fail(f"{pair}: packet {i} raised {type(exc).__name__}: {exc}")
                    assert np.array_equal(out, pages), f"{pair}: packet {i} differs"

    # -------------------------------------------------------------- bad payloads

    def _primed(self) -> Iterator[tuple[MethodHarness, bytes, np.ndarray]]:
        """Fresh harnesses, each already past one good packet, with the next good payload."""
        first, second = self.good_packets(2, 8, salt=6)
        second[:2] = make_pages("random", 2, self.page_size, self.rng(7))
        while True:
            h = self.harness()
            h.decode(h.encode(first), len(first))
            yield h, h.encode(second), second

    def test_corrupt_payload_is_refused_or_exact(self) -> None:
        """Flipped or replaced bytes: MethodError, or pages of exactly the packet's size
        (a method without checksums cannot see every flip)."""
        primed = self._primed()
        rng = self.rng(8)
        h, good, pages = next(primed)
        h.close()
        n = len(good)
        edits: list[tuple[str, Callable[[bytearray], bytes]]] = [
            ("first byte flipped", lambda b: _flip(b, [0])),
            ("bytes 0..7 flipped", lambda b: _flip(b, range(min(8, n)))),
            ("middle byte flipped", lambda b: _flip(b, [n // 2])),
            ("last byte flipped", lambda b: _flip(b, [n - 1])),
            ("random bytes", lambda b: rng.integers(0, 256, n, dtype=np.uint8).tobytes()),
            ("all 0x00", lambda b: bytes(n)),
            ("all 0xff", lambda b: b"\xff" * n),
        ]
        for what, edit in edits:
            h, good, pages = next(primed)
            with h:
                bad = edit(bytearray(good))
                outcome = _outcome(lambda: h.decode(bad, len(pages)))  # noqa: B023
            if isinstance(outcome, np.ndarray):
                assert outcome.shape == pages.shape, \
                    f"{what}: decoded {outcome.shape}, the packet holds {pages.shape}"
            elif not isinstance(outcome, MethodError):
                pytest.fail(f"{what}: raised {type(outcome).__name__} ({outcome}), "
                            f"expected MethodError")

    def test_truncated_payload_is_refused(self) -> None:
        primed = self._primed()
        h, good, pages = next(primed)
        h.close()
        n = len(good)
        for what, cut in [("empty", 0), ("one byte", 1), ("half", n // 2)]:
            h, good, pages = next(primed)
            with h:
                self.assert_refused(lambda: h.decode(good[:cut], len(pages)),  # noqa: B023
                                    f"payload truncated to {what} ({cut} of {n} bytes)")
        h, good, pages = next(primed)
        with h:  # one byte short: refused, or (a trailing marker lost) still exact
            self.assert_refused(lambda: h.decode(good[:-1], len(pages)),
                                f"payload one byte short ({n - 1} of {n})", original=pages)

    def test_payload_for_other_page_count_is_refused(self) -> None:
        primed = self._primed()
        for what, count in [("one page more", 9), ("one page fewer", 7)]:
            h, good, pages = next(primed)
            with h:
                self.assert_refused(lambda: h.decode(good, count),  # noqa: B023
                                    f"a payload of 8 pages decoded as {what}")

    def test_oversized_payload_is_refused(self) -> None:
        with self.harness() as h:
            bound = h.recv_method.max_payload(1)
            self.assert_refused(lambda: h.decode(bytes(bound + 1), 1),
                                f"payload of max_payload(1) + 1 = {bound + 1} bytes")

    # -------------------------------------------------------------- the GIL

    def test_codec_calls_release_the_gil(self) -> None:
        """Two channels in two threads, each encoding and decoding full packets
        (``multifd_core.gilcheck.gil_verdict``).

        Window by window: were both threads runnable (a thread waiting for the GIL sleeps) and
        did both make progress (a codec that holds the GIL stalls the other channel)? Windows
        are added until the votes are clear (at most 24 of 0.1 s)."""
        if not self.releases_gil:
            assert self.gil_reason, "releases_gil = False needs a gil_reason"
            pytest.xfail(f"{self.method_cls.name} is exempt from the GIL check: {self.gil_reason}")
        for engine in self.available_engines():
            try:
                verdict = gil_verdict(lambda e=engine.name: self.method(engine=e),
                                      self.page_size, min_runnable=self.gil_min_runnable)
            except GilCheckUnavailable as exc:
                require(False, str(exc))
                return
            assert verdict.releases, (
                f"engine {engine.name}: {verdict.summary()}. The codec holds the GIL: release "
                f"it around compress/decompress (cffi does; ctypes.PyDLL and Python loops do "
                f"not), or set releases_gil = False with a gil_reason")

    # -------------------------------------------------------------- end to end

    def test_loopback_migration(self) -> None:
        """A native migration over loopback TCP: two channels, a full round then a dirty one."""
        try:
            from multifd_core import loopback
            from multifd_core.engine.ram import RamBlock
        except ImportError as exc:
            require(False, f"multifd_core.loopback is not available ({exc})")
            return
        registry = MethodRegistry(entry_points=False)  # this class, installed or not
        if self.method_cls.name not in registry:
            registry.add(self.method_cls, plugin="conformance", distribution="conformance")
        rng = self.rng(9)
        ps = self.page_size
        blocks = [RamBlock.zeros("pc.ram", (4 * page_count(ps) + 3) * ps, page_size=ps),
                  RamBlock.zeros("vga.vram", 40 * ps, page_size=ps)]
        for b in blocks:
            b.array[:] = mixed_pages(b.used_length // ps, ps, rng).reshape(-1)
        ram = blocks[0]
        dirty = np.unique(rng.integers(0, ram.used_length // ps, 150))

        def before_round(i: int) -> None:
            if i == 1:  # the guest writes between rounds
                ram.array.reshape(-1, ps)[dirty] = mixed_pages(len(dirty), ps, rng)

        dest, stats = loopback.migrate(
            blocks, method=self.method_cls.name, channels=2, level=self.options.get("level"),
            rounds=[{b.name: None for b in blocks}, {ram.name: dirty}],
            before_round=before_round, registry=registry, timeout=60)
        assert stats.rounds == 2
        assert [d.name for d in dest] == [b.name for b in blocks]
        for src, dst in zip(blocks, dest, strict=True):
            assert np.array_equal(dst.array, src.array), f"block {src.name} differs"


def _flip(buf: bytearray, where: Any) -> bytes:
    for i in where:
        buf[i] ^= 0xFF
    return bytes(buf)


def _outcome(fn: Callable[[], np.ndarray]) -> np.ndarray | BaseException:
    try:
        return fn()
    except Exception as exc:  # returned for the caller to judge
        return exc




def assert_struct_layout(ffi: Any, header: str, names: Any = None, **kwargs: Any) -> int:
    """Compare the ffi's declared layouts with ``header`` (``check_struct_layout``) and fail
    naming every mismatch; skip without a compiler or the header (fail under ``CI``). Returns
    how many sizes and offsets matched."""
    try:
        report = struct_layout_report(ffi, header, names, **kwargs)
    except LayoutProbeUnavailable as exc:
        require(False, str(exc))
        return 0
    bad = [LayoutMismatch(what, ours, theirs) for what, ours, theirs in report
           if ours != theirs]
    assert not bad, (f"{len(bad)} of {len(report)} layout figures differ from {header}: "
                     + "; ".join(map(str, bad)))
    return len(report)
