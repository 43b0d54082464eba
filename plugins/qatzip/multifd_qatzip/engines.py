"""The engines of the qatzip method: real libqatzip (QAT device or its software backup) and a
pure-software encoder/decoder of the same QZ-extended gzip format.

Choice, per endpoint: ``MethodOptions.engine`` (``libqatzip`` or ``software``), else the first
available: libqatzip when a QAT device is present (``device.qat_devices``) or
``$MULTIFD_QATZIP_ENGINE=libqatzip`` asks for it, else software. Without a device libqatzip only
runs its software backup and prints "Cannot open /dev/vfio" on every call: it then runs only on
request, with that line filtered out of stderr. ``$MULTIFD_QATZIP_ENGINE=software`` marks
libqatzip unavailable, forcing software.
"""

from __future__ import annotations

import functools
import os
import threading
import zlib
from typing import Any

from multifd_core.errors import LibraryNotFoundError, MethodError, MultiFDError
from multifd_core.method import EngineInfo
from multifd_core.native import ENGINE_SWITCH_VALUES, filter_stderr, quiet_stderr
from multifd_core.wire import PACKET_SIZE
from multifd_qatzip import _ffi, device, gzipqz

ENV_ENGINE = "MULTIFD_QATZIP_ENGINE"
LIBRARY_ENGINE = "libqatzip"
SOFTWARE_ENGINE = "software"
ENGINE_NAMES = (LIBRARY_ENGINE, SOFTWARE_ENGINE)
#: What libqatzip (its QAT user-space layer) prints at set-up on a machine without a device.
NO_DEVICE_NOISE = "Cannot open /dev/vfio"


class SoftwareEngine:
    """Writes one QZ-extended member per 64 KiB chunk; decodes any gzip members (zlib)."""

    name = SOFTWARE_ENGINE

    def __init__(self, level: int, channel: int) -> None:
        self.level = level
        self.channel = channel

    def compress(self, data: memoryview) -> list[Any]:
        return gzipqz.encode(data, self.level)

    def decompress_into(self, payload: memoryview, out: memoryview) -> int:
        return gzipqz.decode_into(payload, out, self.channel)

    def close(self) -> None:
        return None


class LibQatzipEngine:
    """One QATzip session per channel, set up as QEMU does (sw_backup=1, deflate defaults,
    the level), with a reused output buffer. cffi releases the GIL around each call."""

    name = LIBRARY_ENGINE

    def __init__(self, level: int, channel: int) -> None:
        opened = _ffi.load()
        self.lib, self.channel = opened.lib, channel
        if not devices():
            filter_stderr(NO_DEVICE_NOISE)  # printed on every call without a device
        ffi = _ffi.ffi
        self.sess = ffi.new("QzSession_T *")
        with quiet_stderr(NO_DEVICE_NOISE):
            self._setup(level, channel)
        self.hardware = _hw_count(self.lib, self.sess) > 0
        self._out = ffi.new("unsigned char[]", self.lib.qzMaxCompressedLength(PACKET_SIZE,
                                                                              self.sess))
        self._lens = ffi.new("unsigned int[2]")
        self._closed = False

    def _setup(self, level: int, channel: int) -> None:
        ffi = _ffi.ffi
        rc = self.lib.qzInit(self.sess, 1)
        if rc not in (_ffi.QZ_OK, _ffi.QZ_DUPLICATE, _ffi.QZ_NO_HW):  # no device: sw backup
            raise MultiFDError(f"multifd {channel}: qzInit failed ({rc})")
        params = ffi.new("QzSessionParamsDeflate_T *")
        rc = self.lib.qzGetDefaultsDeflate(params)
        if rc != 0:
            raise MultiFDError(f"multifd {channel}: qzGetDefaultsDeflate failed ({rc})")
        params.common_params.comp_lvl = level
        self._params = params
        rc = self.lib.qzSetupSessionDeflate(self.sess, params)
        if rc not in (_ffi.QZ_OK, _ffi.QZ_DUPLICATE):
            self.lib.qzClose(self.sess)
            raise MultiFDError(f"multifd {channel}: qzSetupSessionDeflate failed ({rc})")

    def compress(self, data: memoryview) -> list[Any]:
        ffi, lens = _ffi.ffi, self._lens
        size = len(data)
        if size > PACKET_SIZE:
            raise MethodError(f"multifd {self.channel}: unexpectedly large input",
                              field="input", received=size, expected=f"<= {PACKET_SIZE}")
        lens[0], lens[1] = size, len(self._out)
        rc = self.lib.qzCompress(self.sess, ffi.from_buffer(data), lens, self._out, lens + 1, 1)
        if rc != 0:
            raise MethodError(f"multifd {self.channel}: QATzip returned {rc} instead of QZ_OK",
                              field="qzCompress", received=rc, expected=0)
        if lens[0] != size:
            raise MethodError(f"multifd {self.channel}: QATzip failed to compress all input",
                              field="consumed", received=lens[0], expected=size)
        return [ffi.buffer(self._out, lens[1])]

    def decompress_into(self, payload: memoryview, out: memoryview) -> int:
        ffi, lens = _ffi.ffi, self._lens
        lens[0], lens[1] = len(payload), len(out)
        rc = self.lib.qzDecompress(self.sess, ffi.from_buffer(payload), lens,
                                   ffi.from_buffer(out, require_writable=True), lens + 1)
        if rc != 0 or lens[0] != len(payload):
            # A decode that failed or stopped on a full output leaves the session unusable
            # (every later qzDecompress returns QZ_DATA_ERROR): set it up afresh.
            self._reset()
        if rc != 0:
            raise MethodError(f"multifd {self.channel}: qzDecompress failed",
                              field="qzDecompress", received=rc, expected=0,
                              channel=self.channel)
        if lens[0] != len(payload):  # QATzip stops when its output is full: a bomb, or junk
            raise MethodError(f"multifd {self.channel}: qzDecompress failed: the payload "
                              f"decodes to more than the packet's pages",
                              field="consumed", received=int(lens[0]), expected=len(payload),
                              channel=self.channel)
        return int(lens[1])

    def _reset(self) -> None:
        self.lib.qzTeardownSession(self.sess)
        with quiet_stderr(NO_DEVICE_NOISE):
            self.lib.qzSetupSessionDeflate(self.sess, self._params)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.lib.qzTeardownSession(self.sess)
            self.lib.qzClose(self.sess)


def _hw_count(lib: Any, sess: Any) -> int:
    status = _ffi.ffi.new("QzStatus_T *")
    return int(status.qat_hw_count) if lib.qzGetStatus(sess, status) == 0 else 0


#: What ``$MULTIFD_QATZIP_ENGINE`` may say: the plugins' common switch, and ``libqatzip``.
ENGINE_VALUES = (*ENGINE_SWITCH_VALUES, LIBRARY_ENGINE)


def engine_switch() -> str:
    """``$MULTIFD_QATZIP_ENGINE``, checked: a typo is an error naming the valid values."""
    raw = os.environ.get(ENV_ENGINE, "")
    value = raw.strip().lower()
    if value not in ("", *ENGINE_VALUES):
        raise MultiFDError(f"{ENV_ENGINE}={raw!r} is not a valid value: use "
                           f"{' or '.join(ENGINE_VALUES)} (or leave it unset)")
    return value


def forced_software() -> bool:
    """``$MULTIFD_QATZIP_ENGINE=software``: this endpoint uses only the software engine."""
    return engine_switch() == "software"


def library_requested() -> bool:
    """``$MULTIFD_QATZIP_ENGINE=libqatzip``: prefer libqatzip even without a QAT device."""
    return engine_switch() == LIBRARY_ENGINE


@functools.cache
def devices() -> tuple[str, ...]:
    """The QAT devices of this machine (looked up once per process)."""
    return tuple(device.qat_devices())


_probe_lock = threading.Lock()
_probes: dict[str, bool] = {}


def _has_device(opened: Any) -> bool:
    """Whether a QATzip session finds a QAT device (probed once per library, and only when
    a device node exists: without one the probe would only print noise)."""
    if not devices():
        return False
    with _probe_lock:
        if opened.path not in _probes:
            probe = LibQatzipEngine(1, -1)
            try:
                _probes[opened.path] = probe.hardware
            finally:
                probe.close()
        return _probes[opened.path]


def engine_infos() -> list[EngineInfo]:
    """libqatzip first with a QAT device or on request, else our software engine first."""
    forced = forced_software()
    try:
        opened = _ffi.load()
    except LibraryNotFoundError as exc:
        lib_info = EngineInfo(LIBRARY_ENGINE, "software", False, f"no library: {exc}",
                              path="native")
    else:
        hardware = _has_device(opened)
        found = ", ".join(devices())
        if hardware:
            reason = f"QAT device found ({found})"
        elif found:
            reason = (f"QAT device nodes ({found}) but libqatzip finds no usable device: it "
                      "runs its software backup, as QEMU does")
        else:
            reason = (f"no QAT device (no /dev/qat_*, no QAT function bound to vfio-pci): "
                      f"libqatzip runs its software backup, as QEMU does; used only on "
                      f"request (--engine {LIBRARY_ENGINE} or {ENV_ENGINE}={LIBRARY_ENGINE})")
        if forced:
            reason = f"forced off by {ENV_ENGINE}=software ({reason})"
        lib_info = EngineInfo(LIBRARY_ENGINE, "hardware" if hardware else "software",
                              not forced, reason, opened.path, opened.version_label, path="native")
    first = lib_info.available and (lib_info.kind == "hardware" or library_requested())
    why = f"forced by {ENV_ENGINE}=software" if forced else \
        ("in use: libqatzip is not loadable" if not lib_info.available else
         "used when libqatzip runs only on request" if not first else
         "used on request")
    ours = EngineInfo(SOFTWARE_ENGINE, "software", True, why, "zlib",
                      zlib.ZLIB_RUNTIME_VERSION, path="native")
    return [lib_info, ours] if first else [ours, lib_info]


def create(name: str, level: int, channel: int) -> SoftwareEngine | LibQatzipEngine:
    if name == LIBRARY_ENGINE:
        return LibQatzipEngine(level, channel)
    return SoftwareEngine(level, channel)
