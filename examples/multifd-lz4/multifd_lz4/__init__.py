"""multifd-lz4: an example third-party multifd method (lz4 frames, one stream per channel).

Registered through the ``multifd.methods`` entry point ``lz4 = "multifd_lz4"``: the core imports
this module and calls ``multifd_register_methods``.
"""

from __future__ import annotations

from typing import Any

from multifd_core import EngineInfo, LevelRange, Method, MethodError, hookimpl
from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.errors import LibraryNotFoundError
from multifd_lz4 import _native, _python
from multifd_lz4._format import payload_bound

__version__ = "0.1.0"


class Lz4(Method):
    """lz4 frames: each channel is one frame of linked blocks, flushed at every packet end."""

    name = "lz4"
    code = 0x06  # a third-party value: two bits of 0x3E; QEMU's methods use single bits
    api_version = "1.0"
    levels = LevelRange(1, 12, 1)  # 1-2: lz4 fast; 3-12: lz4 HC
    description = "lz4 frame per channel (third-party example; multifd endpoints only)"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        out = []
        try:
            lib = _native.load()
            out.append(EngineInfo("liblz4", "software", True, library=lib.path,
                                  library_version=lib.version))
        except LibraryNotFoundError as exc:
            out.append(EngineInfo("liblz4", "software", False, reason=str(exc),
                                  library=_native.library_path()))
        try:
            out.append(EngineInfo("python-lz4", "software", True, library="lz4 (PyPI)",
                                  library_version=_python.version()))
        except ImportError as exc:
            out.append(EngineInfo("python-lz4", "software", False,
                                  reason=f"pip install lz4 ({exc})"))
        return out

    def max_payload(self, normal_pages: int) -> int:
        return payload_bound(normal_pages * self.page_size) if normal_pages else 0

    @hookimpl
    def send_setup(self, channel: ChannelContext) -> None:
        native = self.engine == "liblz4"
        channel.engine = self.engine
        channel.state = (_native.NativeEncoder if native else _python.PythonEncoder)(self.level)

    @hookimpl
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        return channel.state.compress(packet.iovecs())

    @hookimpl
    def send_cleanup(self, channel: ChannelContext) -> None:
        if channel.state is not None:
            channel.state.close()
            channel.state = None

    @hookimpl
    def recv_setup(self, channel: ChannelContext) -> None:
        native = self.engine == "liblz4"
        channel.engine = self.engine
        channel.state = (_native.NativeDecoder if native else _python.PythonDecoder)()

    @hookimpl
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        if packet.next_packet_size == 0:
            raise MethodError(f"lz4: empty payload for {packet.normal_pages} pages",
                              field="next_packet_size", received=0, expected="> 0",
                              channel=channel.id)
        pages = channel.state.decompress(packet.read_payload(), packet.expected_size)
        packet.write_pages(pages)

    @hookimpl
    def recv_cleanup(self, channel: ChannelContext) -> None:
        if channel.state is not None:
            channel.state.close()
            channel.state = None


@hookimpl
def multifd_register_methods(register: Any) -> None:
    register(Lz4)
