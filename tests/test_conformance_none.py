"""The built-in ``none`` method against the plugin conformance kit (its first user)."""


import zlib
from pathlib import Path

import numpy as np
import pytest

from multifd_core import EngineInfo, hookimpl
from multifd_core.errors import MethodError
from multifd_core.methods.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.methods.nocomp import NoCompression
from multifd_core.testing import MethodConformance

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class TestNoneConformance(MethodConformance):
    method_cls = NoCompression
    stateful = False
    # none has no codec call: its send is zero-copy iovecs and, in a session, its receive is a
    # socket read straight into the pages (recv_into releases the GIL). Under the sans-IO
    # harness only Python-level buffer copies run, so the two-thread check cannot apply.
    releases_gil = False
    gil_reason = "no codec: send is zero-copy iovecs; receive is a socket read into the pages"


class TestNoneConformance64k(TestNoneConformance):
    """The same with 64 KiB pages (8 pages a packet), as on aarch64 or ppc64 hosts."""

    page_size = 65536
    channels = 2


# ---------------------------------------------------------------- the kit catches broken methods

class _Sloppy(NoCompression):
    """Decodes with numpy and no size check: a short payload raises ValueError."""

    name = "sloppy"
    code = 0x0A

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        data = np.frombuffer(packet.read_payload(), dtype=np.uint8)
        packet.write_pages(data.reshape(packet.normal_pages, packet.page_size))


class _SharedKey(NoCompression):
    """XORs each packet with a key from a packet counter kept on the method, not the channel:
    stateful, and its channels interfere."""

    name = "sharedkey"
    code = 0x0C

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.sent = self.received = 0

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * self.page_size

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[bytes]:
        self.sent += 1
        return [(packet.pages() ^ np.uint8(self.sent)).tobytes()]

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        self.received += 1
        data = np.frombuffer(packet.read_payload(), dtype=np.uint8) ^ np.uint8(self.received)
        packet.write_pages(data)


_TABLE = bytes(range(255, -1, -1))


class _HoldsGil(NoCompression):
    """A 'codec' (bytes.translate) that never releases the GIL."""

    name = "holdsgil"
    code = 0x12

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[bytes]:
        data = bytes(packet.data())
        for _ in range(8):
            data = data.translate(_TABLE)
        return [data]

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        data = bytes(packet.read_payload())
        for _ in range(8):
            data = data.translate(_TABLE)
        packet.write_pages(data)


class _GzipFallback(NoCompression):
    """Engine "native" writes and reads zlib streams; its fallback writes gzip by mistake (and
    reads gzip), so each engine passes alone and only the pairs fail."""

    name = "gzipfallback"
    code = 0x14

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return [EngineInfo("native", "software", True), EngineInfo("fallback", "software", True)]

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name
        self.wbits = 15 if self.engine == "native" else 31  # 31: gzip, the bug

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * self.page_size + 1024

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[bytes]:
        c = zlib.compressobj(1, zlib.DEFLATED, self.wbits)
        return [c.compress(packet.data()) + c.flush()]

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        try:
            data = zlib.decompress(packet.read_payload(), self.wbits)
        except zlib.error as exc:
            raise MethodError(f"bad stream: {exc}", field="payload") from None
        packet.write_pages(data)


def _kit(cls: type, **attrs: object) -> MethodConformance:
    return type("Kit", (MethodConformance,), {"method_cls": cls, **attrs})()


def test_kit_catches_an_exception_other_than_method_error() -> None:
    with pytest.raises(pytest.fail.Exception, match="raised ValueError"):
        _kit(_Sloppy).test_truncated_payload_is_refused()


def test_kit_catches_a_stateful_method_declared_stateless() -> None:
    with pytest.raises(AssertionError, match="set stateful = True"):
        _kit(_SharedKey).test_stream_state()


def test_kit_catches_state_shared_between_channels() -> None:
    with pytest.raises(AssertionError, match="channel . packet . differs"):
        _kit(_SharedKey, stateful=True).test_roundtrip_channels_rounds_packets()


def test_kit_catches_a_codec_that_holds_the_gil() -> None:
    with pytest.raises(AssertionError, match="holds the GIL"):
        _kit(_HoldsGil).test_codec_calls_release_the_gil()


def test_kit_refuses_an_undeclared_gil_exemption() -> None:
    with pytest.raises(AssertionError, match="needs a gil_reason"):
        _kit(_HoldsGil, releases_gil=False).test_codec_calls_release_the_gil()


def test_kit_names_the_engine_pair_that_fails() -> None:
    """A fallback that writes gzip instead of zlib fails only across engines: the message says
    which engine encoded and which decoded."""
    with pytest.raises(pytest.fail.Exception,
                       match=r"encoded by engine native, decoded by engine fallback: packet 0 "
                             r"raised MethodError: bad stream"):
        _kit(_GzipFallback).test_every_available_engine_and_cross_engine()


@pytest.mark.parametrize("variant", ["PyDllLz4", "PurePython"])
def test_kit_catches_a_codec_called_through_ctypes_pydll_or_a_python_loop(variant: str) -> None:
    """liblz4 through ctypes.PyDLL keeps the GIL during short calls; a per-page Python loop
    never releases it. The previous kit passed each about 45% of the time (benchmarks/
    bench_gil.py); the verdict must be "holds" every time."""
    from benchmarks import bench_gil

    with pytest.raises(AssertionError, match="holds the GIL"):
        _kit(getattr(bench_gil, variant)).test_codec_calls_release_the_gil()
