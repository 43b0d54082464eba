"""The qpl method (flag 0x08): QEMU's per-page raw DEFLATE container, level 1, no levels."""

from __future__ import annotations

from multifd_core import perpage
from multifd_core.context import ChannelContext
from multifd_core.errors import MultiFDError
from multifd_core.method import EngineInfo, MethodOptions
from multifd_core.wire import page_count
from multifd_qpl import engines, software


class Qpl(perpage.PerPageMethod):
    """Options: ``extra["backend"]`` = ``isal`` or ``zlib`` picks the software engine's
    DEFLATE library (default: isal when installed); ``extra["native"] = False`` makes it run
    the Python per-page loop even where the C helper (multifd-pagecodec) is built (for
    benchmarks and tests; the bytes are the same)."""

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
        self.native = bool(self.options.extra.get("native", True))

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        return engines.engine_infos()

    def engine_info(self) -> EngineInfo:
        """The software engine with this instance's backend and path."""
        info = super().engine_info()
        if info.name != engines.SOFTWARE_ENGINE:
            return info
        return engines.software_info(self.backend or software.default_backend(), self.native)

    def open_channel(self, channel: ChannelContext, sending: bool) -> None:
        channel.state = engines.create(self.engine, self.page_size, channel.id,
                                       page_count(self.page_size), self.backend,
                                       self.native)
