"""The uadk method (flag 0x10): QEMU's per-page container with zlib-wrapped blobs."""

from __future__ import annotations

from typing import Any

from multifd_core import perpage
from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.hookspecs import hookimpl
from multifd_core.method import EngineInfo, Method, MethodOptions
from multifd_core.wire import page_count
from multifd_uadk import engines


class Uadk(Method):
    """Options: ``extra["software_compress"] = True`` makes the software sender compress
    with zlib instead of sending raw (for peers known to decode it: this plugin, or QEMU
    with UADK hardware); off by default, as in QEMU."""

    name = "uadk"
    code = 0x10
    description = "per-page zlib (HiSilicon ZIP via UADK; software sends raw, decodes zlib)"

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name
        self.software_compress = bool(self.options.extra.get("software_compress", False))

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return engines.engine_infos()

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * (4 + self.page_size)

    def _open(self, channel: ChannelContext, compress: bool) -> None:
        channel.state = engines.create(self.engine, self.page_size, channel.id,
                                       page_count(self.page_size), compress=compress,
                                       software_compress=self.software_compress)
        channel.engine = self.engine

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        self._open(channel, compress=True)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(perpage.page_rows(packet.pages()))

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        self._open(channel, compress=False)

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        out = channel.buffer(packet.expected_size)
        channel.state.decompress_into(packet.read_payload(), packet.normal_pages, out)
        packet.write_pages(out)

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        channel.close_state()
