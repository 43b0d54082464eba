"""The qatzip method (flag 0x20): one whole-packet QZ-extended gzip payload per packet."""

from __future__ import annotations

from typing import Any

from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.hookspecs import hookimpl
from multifd_core.method import (
    EngineInfo,
    LevelRange,
    Method,
    MethodOptions,
)
from multifd_core.wire import PACKET_SIZE
from multifd_qatzip import engines


class Qatzip(Method):
    name = "qatzip"
    code = 0x20
    levels = LevelRange(1, 9, 1)
    description = "QATzip gzip members per packet (Intel QAT, or libqatzip/zlib in software)"

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return engines.engine_infos()

    def _open(self, channel: ChannelContext) -> None:
        channel.state = engines.create(self.engine, self.level or 1, channel.id)

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        self._open(channel)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(packet.data())

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        self._open(channel)

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        expected = packet.expected_size
        out = channel.buffer(PACKET_SIZE)  # QEMU's output buffer; more than expected: error
        got = channel.state.decompress_into(packet.read_payload(), out)
        if got != expected:
            raise packet.size_error(got)
        packet.write_pages(out[:expected])

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()
