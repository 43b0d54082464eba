"""The uadk method (flag 0x10): QEMU's per-page container with zlib-wrapped blobs."""

from __future__ import annotations

from multifd_core import perpage
from multifd_core.context import ChannelContext
from multifd_core.method import EngineInfo, MethodOptions
from multifd_core.wire import page_count
from multifd_uadk import engines


class Uadk(perpage.PerPageMethod):
    """Options: ``extra["software_compress"] = True`` makes the software sender compress
    with zlib instead of sending raw (for peers known to decode it: this plugin, or QEMU
    with UADK hardware); off by default, as in QEMU. ``extra["native"] = False`` makes the
    software engine run its Python per-page loop even where the C helper (multifd-pagecodec)
    is built (benchmarks, tests; the bytes are the same)."""

    name = "uadk"
    code = 0x10
    description = "per-page zlib (HiSilicon ZIP via UADK; software sends raw, decodes zlib)"

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.engine = self.choose_engine(self.options.engine).name
        self.software_compress = bool(self.options.extra.get("software_compress", False))
        self.native = bool(self.options.extra.get("native", True))

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return engines.engine_infos()

    def engine_info(self) -> EngineInfo:
        """The software engine with this instance's path."""
        info = super().engine_info()
        if info.name != engines.SOFTWARE_ENGINE:
            return info
        return engines.software_info(self.native)

    def open_channel(self, channel: ChannelContext, sending: bool) -> None:
        channel.state = engines.create(self.engine, self.page_size, channel.id,
                                       page_count(self.page_size), compress=sending,
                                       software_compress=self.software_compress,
                                       native=self.native)
