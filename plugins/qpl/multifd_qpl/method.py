"""The qpl method (flag 0x08): QEMU's per-page raw DEFLATE container, level 1, no levels."""

from __future__ import annotations

from typing import Any

from multifd_core import perpage
from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.errors import MultiFDError
from multifd_core.hookspecs import hookimpl
from multifd_core.method import EngineInfo, Method, MethodOptions
from multifd_core.wire import page_count
from multifd_qpl import engines, software


class Qpl(Method):
    """Options: ``extra["backend"]`` = ``isal`` or ``zlib`` picks the software engine's
    DEFLATE library (default: isal when installed)."""

    name = "qpl"
    code = 0x08
    description = "per-page raw DEFLATE (Intel IAA via QPL, or ISA-L/zlib in software)"

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name
        self.backend = self.options.extra.get("backend")
        if self.backend not in (None, *software.BACKENDS):
            raise MultiFDError(f"qpl software backend {self.backend!r}: use "
                               f"{' or '.join(software.BACKENDS)}")

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return engines.engine_infos()

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * (4 + self.page_size)

    def _open(self, channel: ChannelContext) -> None:
        channel.state = engines.create(self.engine, self.page_size, channel.id,
                                       page_count(self.page_size), self.backend)
        channel.engine = self.engine

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        self._open(channel)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(perpage.page_rows(packet.pages()))

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        self._open(channel)

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        out = channel.buffer(packet.expected_size)
        channel.state.decompress_into(packet.read_payload(), packet.normal_pages, out)
        packet.write_pages(out)

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()
