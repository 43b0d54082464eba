"""The engines of the uadk method: a HiSilicon ZIP accelerator through UADK (libwd_comp),
or software.

Software, following QEMU: the sender sends every page raw (always accepted, by QEMU with
or without hardware). The receiver decodes compressed blobs with zlib, where QEMU without
hardware refuses them, so a QEMU sender with hardware can migrate to us.

Choice, per endpoint: ``MethodOptions.engine`` (``uadk`` or ``software``), else the first
available: ``uadk`` when libwd_comp loads and ``wd_comp_init2`` finds a device, else
software. ``$MULTIFD_UADK_ENGINE=software`` marks ``uadk`` unavailable.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import multifd_pagecodec as pagecodec
from multifd_core import perpage
from multifd_core.context import SendPacket
from multifd_core.errors import MethodError, MultiFDError
from multifd_core.method import EngineInfo
from multifd_core.native import HardwareProbe, hardware_engine_info, software_forced
from multifd_uadk import _ffi, software

ENV_ENGINE = "MULTIFD_UADK_ENGINE"
HARDWARE_ENGINE = "uadk"
SOFTWARE_ENGINE = "software"
ENGINE_NAMES = (HARDWARE_ENGINE, SOFTWARE_ENGINE)


class SoftwareEngine(perpage.SoftwareEngine):
    """Sends every page raw, as QEMU without hardware, unless ``compress`` (the
    software_compress option); decodes zlib blobs. Per packet in C when multifd-pagecodec is
    built (unless ``native`` is False), else per page in Python; the same bytes either way."""

    def __init__(self, page_size: int, channel: int, compress: bool = False,
                 native: bool = True) -> None:
        super().__init__("uadk", page_size, channel, software.ZlibPageCodec(page_size, channel),
                         software.native_codec(page_size) if native else None)
        self.software_compress = compress

    def compress(self, packet: SendPacket) -> list[Any]:
        if not self.software_compress:
            return perpage.pack_raw(packet)
        return super().compress(packet)


class _Runtime:
    """``wd_comp_init2`` once per process while any channel uses it (QEMU calls it per
    channel and tolerates -WD_EEXIST; counting keeps the last uninit for the last user)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0

    def acquire(self, lib: Any) -> int:
        with self.lock:
            if self.users == 0:
                rc = lib.wd_comp_init2_(_ffi.ffi.new("char[]", b"zlib"),
                                        lib.SCHED_POLICY_RR, lib.TASK_HW, _ffi.ffi.NULL)
                if rc not in (0, -_ffi.WD_EEXIST):
                    return rc
            self.users += 1
            return 0

    def release(self, lib: Any) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                lib.wd_comp_uninit2()


_runtime = _Runtime()


class UadkEngine:
    """One UADK session per channel and direction, set up as QEMU does (WD_ZLIB, the
    library's default level, 4 KiB window). Untested here: no UADK or device on this
    machine."""

    name = HARDWARE_ENGINE

    def __init__(self, page_size: int, channel: int, page_count: int, compress: bool) -> None:
        ffi = _ffi.ffi
        self.lib = _ffi.load().lib
        self.page_size, self.channel = page_size, channel
        self.codec = software.ZlibPageCodec(page_size, channel)
        rc = _runtime.acquire(self.lib)
        if rc:
            raise MultiFDError(f"multifd {channel}: wd_comp_init2 failed ({rc})")
        op = self.lib.WD_DIR_COMPRESS if compress else self.lib.WD_DIR_DECOMPRESS
        self._params = ffi.new("char[]", _ffi.SCHED_PARAMS_ROOM)
        ffi.cast("struct sched_params *", self._params).type = op
        setup = ffi.new("struct wd_comp_sess_setup *")
        setup.alg_type = self.lib.WD_ZLIB
        setup.op_type = op
        setup.sched_param = self._params
        self.handle = self.lib.wd_comp_alloc_sess(setup)
        if not self.handle:
            _runtime.release(self.lib)
            raise MultiFDError(f"multifd {channel}: failed wd_comp_alloc_sess")
        # Output room: twice a page per page, as QEMU, so output >= input still fits.
        self.buf = ffi.new("uint8_t[]", page_count * page_size * 2)

    def _run(self, op: int, src: Any, src_len: int, dst: Any, dst_len: int) -> int:
        req = _ffi.ffi.new("struct wd_comp_req *")  # zeroed: flat buffers, no callback
        req.op_type, req.src, req.src_len, req.dst, req.dst_len = op, src, src_len, dst, dst_len
        rc = self.lib.wd_do_comp_sync(self.handle, req)
        if rc or req.status:
            verb = "compression" if op == self.lib.WD_DIR_COMPRESS else "decompression"
            raise MethodError(f"multifd {self.channel}: failed {verb}, ret {rc} status "
                              f"{req.status}", field="wd_do_comp_sync",
                              received=(rc, req.status), expected=(0, 0), channel=self.channel)
        return int(req.dst_len)

    def compress(self, packet: SendPacket) -> list[Any]:
        ffi, size = _ffi.ffi, self.page_size
        rows = perpage.page_rows(packet.pages())
        blobs: list[Any] = []
        for i, row in enumerate(rows):
            dst = self.buf + i * 2 * size
            n = self._run(self.lib.WD_DIR_COMPRESS, ffi.from_buffer("uint8_t[]", row), size,
                          dst, 2 * size)
            blobs.append(ffi.buffer(dst, n) if n < size else None)
        return perpage.pack(rows, blobs, size)

    def decompress_into(self, payload: memoryview, normal: int, out: memoryview) -> None:
        ffi, size = _ffi.ffi, self.page_size
        lens, offsets = perpage.lengths(payload, normal, size, self.channel, "uadk")
        src = ffi.from_buffer("uint8_t[]", payload)
        dst = ffi.from_buffer("uint8_t[]", out, require_writable=True)
        for i, (off, n) in enumerate(zip(offsets, lens, strict=True)):
            if n == size:
                out[i * size:(i + 1) * size] = payload[off:off + n]
                continue
            got = self._run(self.lib.WD_DIR_DECOMPRESS, src + off, n, dst + i * size, size)
            if got != size:
                raise MethodError(f"multifd {self.channel}: decompressed length error",
                                  field="decompressed_len", received=got, expected=size,
                                  channel=self.channel)

    def close(self) -> None:
        if self.handle:
            self.lib.wd_comp_free_sess(self.handle)
            self.handle = 0
            _runtime.release(self.lib)


def _probe_zip(opened: Any) -> tuple[bool, str]:
    rc = _runtime.acquire(opened.lib)
    if rc:
        return False, f"no device: wd_comp_init2(zlib) returned {rc}"
    _runtime.release(opened.lib)
    return True, "UADK ZIP device found"


#: (usable, reason, opened library or None); the device is probed once per library.
hardware_status = HardwareProbe(_ffi.load, _probe_zip)


def forced_software() -> bool:
    """``$MULTIFD_UADK_ENGINE=software``: this endpoint uses only the software engine."""
    return software_forced(ENV_ENGINE)


def create(name: str, page_size: int, channel: int, page_count: int, *, compress: bool,
           software_compress: bool = False, native: bool = True) -> SoftwareEngine | UadkEngine:
    if name == HARDWARE_ENGINE:
        return UadkEngine(page_size, channel, page_count, compress)
    return SoftwareEngine(page_size, channel, software_compress, native)


def engine_infos() -> list[EngineInfo]:
    forced = forced_software()
    usable, reason, opened = hardware_status()
    hw = hardware_engine_info(HARDWARE_ENGINE, ENV_ENGINE, usable, reason, opened)
    why = f"forced by {ENV_ENGINE}=software" if forced else \
        ("used when UADK is not usable" if usable else "in use: UADK is not usable here")
    return [hw, software_info(why=why)]


def software_info(native: bool = True, why: str = "") -> EngineInfo:
    """The software engine: native per packet when the C helper runs here (and ``native`` is
    not turned off), else the Python per-page fallback."""
    runs = native and pagecodec.why_not("zlib") is None
    version = pagecodec.library_version("zlib") if runs else zlib.ZLIB_RUNTIME_VERSION
    path = pagecodec.report("zlib") if native else "Python per-page loop (native=False)"
    return EngineInfo(SOFTWARE_ENGINE, "software", True,
                      f"{why + '; ' if why else ''}sends pages raw as QEMU does, decodes zlib "
                      f"blobs; {path}", "zlib",
                      f"{version}, {'native per packet' if runs else 'Python per page'}",
                      "native" if runs else "fallback")
