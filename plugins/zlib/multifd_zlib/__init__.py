"""The ``zlib`` multifd method (flag 0x02), wire-identical to QEMU 10.0.

Each channel carries one zlib stream (standard wrapper, 32 KiB window, memLevel 8) for the
whole session. A packet's normal pages are compressed in one call and the packet ends with
a ``Z_SYNC_FLUSH``; the stream is never finished, so only the channel's first payload starts
with the zlib header (``78 01`` at levels 0 and 1). The receiver inflates each payload with
the channel's persistent stream into at most ``normal_pages * page_size + 1`` bytes: a
payload that yields more or less, ends the stream, or is not deflate data is refused.

CPython's ``zlib`` releases the GIL while it deflates and inflates, so channels compress in
parallel (see ``benchmarks.bench_codecs``).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

from multifd_core import EngineInfo, LevelRange, Method, MethodError, hookimpl
from multifd_core.context import ChannelContext, RecvPacket, SendPacket

__version__ = "0.1.0"

WBITS = 15  # zlib wrapper, 32 KiB window (QEMU: deflateInit(level), inflateInit)
MEM_LEVEL = 8
Z_STREAM_END = 1
Z_DATA_ERROR = -3
_ERROR_CODE = re.compile(r"Error (-?\d+)")


class Zlib(Method):
    name = "zlib"
    code = 0x02
    levels = LevelRange(0, 9, 1)
    description = "one deflate stream per channel, sync-flushed per packet (QEMU's zlib)"

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return [EngineInfo(name="software", kind="software", available=True, library="zlib",
                           library_version=zlib.ZLIB_RUNTIME_VERSION, path="native")]

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        channel.state = zlib.compressobj(self.level, zlib.DEFLATED, WBITS, MEM_LEVEL)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        stream = channel.state
        try:
            body = stream.compress(packet.data())
            tail = stream.flush(zlib.Z_SYNC_FLUSH)
        except zlib.error as exc:
            raise MethodError(f"multifd {channel.id}: deflate returned {_code(exc)} instead "
                              f"of Z_OK ({exc})", field="deflate", received=str(exc),
                              expected="Z_OK", channel=channel.id) from None
        size = len(body) + len(tail)
        bound = self.max_payload(packet.normal_pages)
        if size > bound:
            raise MethodError(f"multifd {channel.id}: deflate output exceeds the receiver's "
                              f"buffer", field="next_packet_size", received=size,
                              expected=f"<= {bound}", channel=channel.id)
        return [body, tail] if body else [tail]

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        channel.state = None

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        channel.state = zlib.decompressobj(WBITS)

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        stream = channel.state
        expected = packet.expected_size
        payload = packet.read_payload()
        try:
            # Bounded: never more than one byte past what the packet may carry.
            out = stream.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise _inflate_error(packet, _code(exc), str(exc)) from None
        if stream.eof:
            raise _inflate_error(packet, Z_STREAM_END, "the peer ended the stream (Z_FINISH)")
        if len(out) > expected:
            raise too_much_output(packet)
        packet.write_pages(out)  # checks len(out) == expected (too few output)

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        channel.state = None


def _code(exc: zlib.error) -> int:
    match = _ERROR_CODE.search(str(exc))
    return int(match.group(1)) if match else Z_DATA_ERROR


def _inflate_error(packet: RecvPacket, code: int, detail: str) -> MethodError:
    return MethodError(
        f"multifd {packet.channel_id}: inflate returned {code} instead of Z_OK ({detail}) "
        f"(packet {packet.packet_num})",
        field="inflate", received=code, expected="Z_OK (0)", channel=packet.channel_id)


def too_much_output(packet: RecvPacket) -> MethodError:
    """A payload that inflates past ``expected_size`` (decoding stopped one byte past it)."""
    expected = packet.expected_size
    return MethodError(
        f"multifd {packet.channel_id}: packet size received more than {expected} size expected "
        f"{expected} (packet {packet.packet_num})",
        field="decoded_size", received=f"> {expected}", expected=expected,
        channel=packet.channel_id)


@hookimpl
def multifd_register_methods(register) -> None:
    register(Zlib)
