"""The built-in ``none`` method: the payload is the raw normal pages, in offset order."""

from __future__ import annotations

from multifd_core.methods.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.methods.hookspecs import hookimpl
from multifd_core.methods.method import EngineInfo, Method


class NoCompression(Method):
    name = "none"
    code = 0x00
    description = "raw pages (QEMU's nocomp); zero-copy send and receive"

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return [EngineInfo("software", "software", True, "socket I/O straight from and into "
                           "RAM pages", path="native")]

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * self.page_size

    def recv_memory(self) -> int:
        return 0  # the payload is received straight into the pages

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[memoryview]:
        return packet.iovecs()

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        # QEMU ignores next_packet_size for none; we insist it is right (readinto_pages
        # refuses any other size), since a wrong value desynchronises the stream.
        packet.readinto_pages()


@hookimpl
def multifd_register_methods(register) -> None:
    register(NoCompression)
