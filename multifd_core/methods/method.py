"""The base class of a multifd method, and what a method declares about itself.

A method is the wire format and its flag code; an engine is one way to produce or consume
that format (a hardware accelerator, a native library, pure software). All engines of a
method are wire-identical, and each endpoint picks its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from multifd_core.errors import MultiFDError
from multifd_core.methods.hookspecs import hookimpl

#: The method-plugin API version this core implements. A plugin declares the API it was
#: built for (``Method.api_version``); a plugin whose major version differs is refused.
API_VERSION = "1.0"

#: QEMU's receive buffer for zlib, zstd and qatzip payloads; no method's payload may exceed it.
MAX_COMPRESSED_PAYLOAD = 1 << 20
#: Bytes of pages in one full packet (``multifd_core.wire.PACKET_SIZE``).
PACKET_SIZE = 512 * 1024


@dataclass(frozen=True)
class EngineInfo:
    """One engine of a method and whether it can run here (``reason`` says why not).

    ``path`` says how the engine runs its work: ``"native"`` (native code, a call per packet
    or per large chunk: a device, a C library), ``"fallback"`` (a slower Python path, such as
    a loop calling a library once per page), or ``""`` (not stated)."""

    name: str
    kind: str  # "hardware" or "software"
    available: bool
    reason: str = ""
    library: str | None = None
    library_version: str | None = None
    path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LevelRange:
    minimum: int
    maximum: int
    default: int

    def check(self, method: str, level: int | None) -> int:
        if level is None:
            return self.default
        if not self.minimum <= level <= self.maximum:
            raise MultiFDError(
                f"level {level} is out of range for method {method}: valid levels are "
                f"{self.minimum} to {self.maximum} (default {self.default})")
        return level


@dataclass
class MethodOptions:
    """Per-session settings of a method: page size, level, preferred engine, extras."""

    page_size: int = 4096
    level: int | None = None
    engine: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    """Subclass, set the class attributes, and implement the six hooks with ``@hookimpl``.

    Class attributes:
      ``name``: the method name users type (``--compression NAME``).
      ``code``: the flag value in the 5-bit compression field: QEMU's methods use 0 or a
      single bit of 0x3E; a third-party method uses a value with two or more bits of 0x3E.
      ``api_version``: the core API version the plugin was written for.
      ``levels``: a ``LevelRange``, or None for a method without levels.
      ``description``: one line for ``multifd methods``.
    """

    name: ClassVar[str] = ""
    code: ClassVar[int] = 0
    api_version: ClassVar[str] = API_VERSION
    levels: ClassVar[LevelRange | None] = None
    description: ClassVar[str] = ""

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = options or MethodOptions()
        self.page_size = self.options.page_size
        if self.levels is not None:
            self.level: int | None = self.levels.check(self.name, self.options.level)
        elif self.options.level is not None:
            raise MultiFDError(f"method {self.name} takes no level")
        else:
            self.level = None
        if self.options.engine is not None:
            self.choose_engine(self.options.engine)

    @classmethod
    def engines(cls) -> list[EngineInfo]:
        """The engines of this method and their availability here. Default: one software one."""
        return [EngineInfo(name="software", kind="software", available=True)]

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether any engine can run here, and if not, why."""
        engines = cls.engines()
        if any(e.available for e in engines):
            return True, ""
        return False, "; ".join(f"{e.name}: {e.reason}" for e in engines) or "no engine"

    @classmethod
    def choose_engine(cls, requested: str | None = None) -> EngineInfo:
        """``requested`` if this method declares it and it is available here, else (for None)
        the first available engine; a ``MultiFDError`` says why none can be used."""
        engines = cls.engines()
        if requested is None:
            for engine in engines:
                if engine.available:
                    return engine
            raise MultiFDError(f"method {cls.name} cannot run here: {cls.available()[1]}")
        for engine in engines:
            if engine.name == requested:
                if not engine.available:
                    raise MultiFDError(f"engine {requested} of method {cls.name} is not "
                                       f"available here: {engine.reason}")
                return engine
        raise MultiFDError(f"method {cls.name} has no engine {requested!r}; its engines: "
                           f"{', '.join(e.name for e in engines) or 'none'}")

    def engine_info(self) -> EngineInfo:
        """The engine this instance runs, for summaries and logs: the one named by
        ``self.engine`` when the plugin set it (the convention), else what ``choose_engine``
        picks for the options. Override it when an option changes the path an engine takes."""
        name = getattr(self, "engine", None)
        if isinstance(name, str):
            for engine in self.engines():
                if engine.name == name:
                    return engine
        return self.choose_engine(self.options.engine)

    def max_payload(self, normal_pages: int) -> int:
        """The largest ``next_packet_size`` this method accepts for ``normal_pages`` pages."""
        return MAX_COMPRESSED_PAYLOAD if normal_pages else 0

    def recv_memory(self) -> int:
        """The most memory one receiving channel of this method holds: the payload buffer,
        decode buffers and decoder state (windows, native sessions). The receiver checks
        ``channels x recv_memory()`` against its memory budget before it accepts a session.

        The default assumes a full-size payload buffer and one packet of decoded output;
        a method whose decoder keeps more (a window larger than a packet) says so here."""
        return self.max_payload(PACKET_SIZE // self.page_size) + PACKET_SIZE

    # The hooks. The defaults do nothing; a method overrides what it needs with @hookimpl.
    @hookimpl
    def send_setup(self, channel: Any) -> None:
        return None

    @hookimpl
    def send_cleanup(self, channel: Any) -> None:
        return None

    @hookimpl
    def recv_setup(self, channel: Any) -> None:
        return None

    @hookimpl
    def recv_cleanup(self, channel: Any) -> None:
        return None
