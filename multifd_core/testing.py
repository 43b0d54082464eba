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
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import pytest

from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.errors import MethodError, MultiFDError
from multifd_core.harness import MethodHarness
from multifd_core.method import EngineInfo, Method, MethodOptions
from multifd_core.pages import page_runs
from multifd_core.registry import MethodRegistry, bind, check_method_class
from multifd_core.wire import page_count

KINDS = ("zero", "text", "random", "sparse", "repeat")


# ---------------------------------------------------------------------- page generators

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


def in_ci() -> bool:
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
    ``gil_min_runnable`` share of the time two busy channel threads must each be runnable
                         (running, or waiting only for a CPU; not asleep on the GIL). Codecs
                         that release the GIL measure 0.96-1.0 here, also with three busy
                         processes per CPU; a codec that holds it, 0.2-0.46 on a quiet
                         machine and at most 0.69 on that loaded one. Default 0.8.
    ``channels``, ``rounds``, ``packets``: the shape of the round-trip test.
    """

    method_cls: ClassVar[type[Method]]
    options: ClassVar[dict[str, Any]] = {}
    page_size: ClassVar[int] = 4096
    stateful: ClassVar[bool] = False
    releases_gil: ClassVar[bool] = True
    gil_reason: ClassVar[str] = ""
    gil_min_runnable: ClassVar[float] = 0.8
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
            send, recv = self.method(engine=a.name), self.method(engine=b.name)
            with self.harness(send=send, recv=recv) as h:
                for i, pages in enumerate(packets):
                    out = h.roundtrip(pages)
                    assert np.array_equal(out, pages), \
                        f"encoded by engine {a.name}, decoded by {b.name}: packet {i} differs"

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
        """Two channels in two threads, each encoding and decoding full packets.

        A thread that waits for the GIL sleeps, so while one channel's codec holds the GIL
        the other channel is neither running nor waiting for a CPU. The share of time each
        thread is runnable therefore measures GIL release directly, whatever else loads the
        machine (time spent waiting for a CPU counts as runnable)."""
        if not self.releases_gil:
            assert self.gil_reason, "releases_gil = False needs a gil_reason"
            pytest.xfail(f"{self.method_cls.name} is exempt from the GIL check: {self.gil_reason}")
        for engine in self.available_engines():
            share = gil_runnable(lambda e=engine.name: self.method(engine=e), self.page_size)
            assert share >= self.gil_min_runnable, (
                f"engine {engine.name}: two channel threads were runnable for only {share:.0%} "
                f"of the time (need {self.gil_min_runnable:.0%}); the rest they slept waiting "
                f"for the GIL: the codec holds the GIL. Release it around compress/decompress, or "
                f"set releases_gil = False with a gil_reason")

    # -------------------------------------------------------------- end to end

    def test_loopback_migration(self) -> None:
        """A native migration over loopback TCP: two channels, a full round then a dirty one."""
        try:
            from multifd_core import loopback
            from multifd_core.ram import RamBlock
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


# ---------------------------------------------------------------------- measuring

def gil_runnable(make_method: Callable[[], Method], page_size: int = 4096,
                 seconds: float = 0.4) -> float:
    """The mean share of time two busy channel threads were runnable.

    Each thread encodes full packets (text-like pages, a quarter random) and decodes them on
    its own channel in a loop, while this thread reads both threads' Linux schedstat over
    one common window. Runnable time is CPU time plus time queued for a CPU, so a loaded
    machine does not lower it; what remains is time asleep waiting for the GIL. Codecs that
    release the GIL give about 1.0; codecs that hold it, about 0.5, since only one thread at
    a time can be inside them.
    """
    n = page_count(page_size)
    pages = make_pages("text", n, page_size, np.random.default_rng(1))
    pages[::4] = make_pages("random", len(pages[::4]), page_size, np.random.default_rng(2))
    errors: list[BaseException] = []
    tids: list[int] = []
    ready = threading.Barrier(3)
    stop = threading.Event()

    def worker() -> None:
        try:
            pipe = _Pipe(make_method, pages)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            return
        try:
            tids.append(threading.get_native_id())
            ready.wait()
            while not stop.is_set():
                pipe.unit()
            assert np.array_equal(pipe.out, pages), "pages differ after the timed round trips"
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
        finally:
            pipe.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # the GIL changes hands only where a call releases it
    try:
        for t in threads:
            t.start()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        else:
            start, before = time.perf_counter(), [_runnable_seconds(t) for t in tids]
            time.sleep(seconds)
            after, wall = [_runnable_seconds(t) for t in tids], time.perf_counter() - start
        stop.set()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return sum(a - b for a, b in zip(after, before, strict=True)) / (2 * wall)


def _runnable_seconds(tid: int) -> float:
    """A thread's time running or queued for a CPU, in seconds (Linux schedstat)."""
    path = f"/proc/self/task/{tid}/schedstat"
    try:
        with open(path) as f:
            running, queued, _ = f.read().split()
    except OSError as exc:
        pytest.skip(f"the GIL check reads {path}, which needs Linux with schedstat ({exc})")
    return (int(running) + int(queued)) / 1e9


class _Pipe:
    """One channel's send and receive hooks on one packet, without the harness's copies."""

    def __init__(self, make_method: Callable[[], Method], pages: np.ndarray) -> None:
        send, recv = make_method(), make_method()
        n, ps = pages.shape
        self.code, self.n, self.ps = recv.code, n, ps
        self.send, self.recv = bind(send), bind(recv)
        self.sctx, self.rctx = ChannelContext(0, ps), ChannelContext(0, ps)
        self.send.send_setup(channel=self.sctx)
        self.recv.recv_setup(channel=self.rctx)
        index = np.arange(n, dtype=np.int64)
        scratch = np.empty(pages.size, dtype=np.uint8)
        self.packet = SendPacket("gil", ps, pages, index, page_runs(pages.reshape(-1), index, ps),
                                 lambda size: memoryview(scratch)[:size])
        self.wire = np.empty(recv.max_payload(n), dtype=np.uint8)
        self.out = np.zeros_like(pages)
        self.flat = self.out.reshape(-1)
        self.count = 0

    def unit(self) -> None:
        pos = 0
        payload = self.send.send_prepare(channel=self.sctx, packet=self.packet)
        for part in payload:
            src = np.frombuffer(part, dtype=np.uint8)
            np.copyto(self.wire[pos : pos + src.size], src)  # the socket, GIL released
            pos += src.size
        wire = memoryview(self.wire[:pos])
        self.count += 1
        packet = RecvPacket(
            channel_id=0, packet_num=self.count, flags=self.code, normal_pages=self.n,
            next_packet_size=pos, page_size=self.ps, read=lambda size: wire[:size],
            readinto_pages=lambda: np.copyto(self.flat, self.wire[: self.flat.size]),
            write=lambda buf: np.copyto(self.flat, np.frombuffer(buf, dtype=np.uint8)))
        self.recv.recv(channel=self.rctx, packet=packet)

    def close(self) -> None:
        self.send.send_cleanup(channel=self.sctx)
        self.recv.recv_cleanup(channel=self.rctx)


def _flip(buf: bytearray, where: Any) -> bytes:
    for i in where:
        buf[i] ^= 0xFF
    return bytes(buf)


def _outcome(fn: Callable[[], np.ndarray]) -> np.ndarray | BaseException:
    try:
        return fn()
    except Exception as exc:  # returned for the caller to judge
        return exc


