"""The engines of the qpl method: Intel IAA through libqpl's hardware path, or software raw
DEFLATE (ISA-L or zlib). Both produce QEMU's per-page container (``multifd_core.perpage``).

Choice, per endpoint: ``MethodOptions.engine`` (``iaa`` or ``software``), else the first
available: ``iaa`` when libqpl loads and an IAA device accepts a hardware job, else
software. ``$MULTIFD_QPL_ENGINE=software`` marks ``iaa`` unavailable.
"""

from __future__ import annotations

from typing import Any

import multifd_pagecodec as pagecodec
from multifd_core import perpage
from multifd_core.context import SendPacket
from multifd_core.errors import MethodError, MultiFDError
from multifd_core.method import EngineInfo
from multifd_core.native import HardwareProbe, hardware_engine_info, software_forced
from multifd_qpl import _ffi, software

ENV_ENGINE = "MULTIFD_QPL_ENGINE"
HARDWARE_ENGINE = "iaa"
SOFTWARE_ENGINE = "software"
ENGINE_NAMES = (HARDWARE_ENGINE, SOFTWARE_ENGINE)
SUBMIT_RETRIES = 3  # as QEMU: then the page goes through the software path


def software_engine(page_size: int, channel: int, backend: str | None = None,
                    native: bool = True) -> perpage.SoftwareEngine:
    """The software engine: the C helper per packet when it runs the backend here (unless
    ``native`` is False), else the Python loop per page; the same bytes either way."""
    codec = software.DeflateCodec(page_size, channel, backend)
    packets = software.native_codec(codec.backend, page_size) if native else None
    return perpage.SoftwareEngine("qpl", page_size, channel, codec, packets)


class IaaEngine:
    """One libqpl hardware job per page slot, as QEMU: submit all pages, then wait for each.
    A page whose job cannot be submitted goes through the software codec; a page whose job
    fails is sent raw. Untested here: no IAA device or libqpl on this machine."""

    name = HARDWARE_ENGINE

    def __init__(self, page_size: int, channel: int, page_count: int) -> None:
        opened = _ffi.load()
        ffi, lib = _ffi.ffi, opened.lib
        self.lib, self.page_size, self.channel = lib, page_size, channel
        self.codec = software.DeflateCodec(page_size, channel)
        size = ffi.new("uint32_t *")
        status = lib.qpl_get_job_size(lib.qpl_path_hardware, size)
        if status != _ffi.QPL_STS_OK:
            raise MultiFDError(f"multifd {channel}: qpl_get_job_size failed with error "
                               f"{status}")
        self._memory: list[Any] = []
        self.jobs: list[Any] = []
        for _ in range(page_count):
            mem = ffi.new("uint8_t[]", size[0])
            job = ffi.cast("qpl_job *", mem)
            status = lib.qpl_init_job(lib.qpl_path_hardware, job)
            if status != _ffi.QPL_STS_OK:
                self.close()
                raise MultiFDError(f"multifd {channel}: qpl_init_job failed with error "
                                   f"{status}")
            self._memory.append(mem)
            self.jobs.append(job)
        self.zbuf = ffi.new("uint8_t[]", page_count * page_size)

    def _prepare(self, job: Any, op: int, src: Any, src_len: int, dst: Any, dst_len: int
                 ) -> None:
        job.op = op
        job.next_in_ptr = src
        job.available_in = src_len
        job.next_out_ptr = dst
        job.available_out = dst_len
        job.flags = _ffi.QPL_FLAG_FIRST | _ffi.QPL_FLAG_LAST | _ffi.QPL_FLAG_OMIT_VERIFY
        job.level = 1

    def _submit(self, job: Any) -> bool:
        for _ in range(SUBMIT_RETRIES + 1):
            status = self.lib.qpl_submit_job(job)
            if status != _ffi.QPL_STS_QUEUES_ARE_BUSY_ERR:
                return status == _ffi.QPL_STS_OK
        return False

    def compress(self, packet: SendPacket) -> list[Any]:
        ffi, size = _ffi.ffi, self.page_size
        rows = perpage.page_rows(packet.pages())
        pages = [ffi.from_buffer("uint8_t[]", row) for row in rows]
        blobs: list[Any] = [None] * len(rows)
        submitted = [False] * len(rows)
        for i, src in enumerate(pages):
            self._prepare(self.jobs[i], self.lib.qpl_op_compress, src, size,
                          self.zbuf + i * size, size - 1)
            submitted[i] = self._submit(self.jobs[i])
            if not submitted[i]:
                blobs[i] = self.codec.compress(rows[i])
        for i, job in enumerate(self.jobs[:len(rows)]):
            if submitted[i] and self.lib.qpl_wait_job(job) == _ffi.QPL_STS_OK:
                blobs[i] = ffi.buffer(self.zbuf + i * size, job.total_out)
        return perpage.pack(rows, blobs, size)

    def decompress_into(self, payload: memoryview, normal: int, out: memoryview) -> None:
        ffi, size = _ffi.ffi, self.page_size
        lens, offsets = perpage.lengths(payload, normal, size, self.channel, "qpl")
        src = ffi.from_buffer("uint8_t[]", payload)
        dst = ffi.from_buffer("uint8_t[]", out, require_writable=True)
        pending: list[int] = []
        for i, (off, n) in enumerate(zip(offsets, lens, strict=True)):
            if n == size:
                out[i * size:(i + 1) * size] = payload[off:off + n]
                continue
            self._prepare(self.jobs[i], self.lib.qpl_op_decompress, src + off, n,
                          dst + i * size, size)
            if self._submit(self.jobs[i]):
                pending.append(i)
            else:
                self.codec.decode(payload[off:off + n], out[i * size:(i + 1) * size])
        for i in pending:
            job = self.jobs[i]
            status = self.lib.qpl_wait_job(job)
            if status != _ffi.QPL_STS_OK or job.total_out != size:
                for j in pending:  # let every submitted job finish before failing
                    if j > i:
                        self.lib.qpl_wait_job(self.jobs[j])
                raise container_error(self.channel, status, job.total_out, size)

    def close(self) -> None:
        for job in self.jobs:
            self.lib.qpl_fini_job(job)
        self.jobs = []
        self._memory = []


def container_error(channel: int, status: int, total_out: int, size: int) -> MethodError:
    if status != _ffi.QPL_STS_OK:
        return MethodError(f"multifd {channel}: qpl job failed with error {status}",
                           field="qpl_status", received=status, expected=0, channel=channel)
    return MethodError(f"multifd {channel}: qpl decompressed len {total_out}, expected len "
                       f"{size}", field="decompressed_len", received=total_out, expected=size,
                       channel=channel)


def _probe_iaa(opened: Any) -> tuple[bool, str]:
    """A hardware-path job inits (and is freed again)."""
    ffi, lib = _ffi.ffi, opened.lib
    size = ffi.new("uint32_t *")
    status = lib.qpl_get_job_size(lib.qpl_path_hardware, size)
    if status == _ffi.QPL_STS_OK and size[0]:
        mem = ffi.new("uint8_t[]", size[0])
        status = lib.qpl_init_job(lib.qpl_path_hardware, ffi.cast("qpl_job *", mem))
        if status == _ffi.QPL_STS_OK:
            lib.qpl_fini_job(ffi.cast("qpl_job *", mem))
    if status == _ffi.QPL_STS_OK:
        return True, "IAA device found"
    return False, f"no IAA device (qpl_init_job hardware path: status {status})"


#: (usable, reason, opened library or None): libqpl loads and a hardware job inits.
hardware_status = HardwareProbe(_ffi.load, _probe_iaa)


def forced_software() -> bool:
    """``$MULTIFD_QPL_ENGINE=software``: this endpoint uses only the software engine."""
    return software_forced(ENV_ENGINE)


def create(name: str, page_size: int, channel: int, page_count: int,
           backend: str | None = None, native: bool = True
           ) -> perpage.SoftwareEngine | IaaEngine:
    if name == HARDWARE_ENGINE:
        return IaaEngine(page_size, channel, page_count)
    return software_engine(page_size, channel, backend, native)


def engine_infos() -> list[EngineInfo]:
    forced = forced_software()
    usable, reason, opened = hardware_status()
    hw = hardware_engine_info(HARDWARE_ENGINE, ENV_ENGINE, usable, reason, opened)
    backend = software.default_backend()
    why = f"forced by {ENV_ENGINE}=software" if forced else \
        ("used when IAA is not usable" if usable else "in use: IAA is not usable here")
    return [hw, software_info(backend, why=why)]


def software_info(backend: str, native: bool = True, why: str = "") -> EngineInfo:
    """The software engine with ``backend``: native per packet when the C helper runs it here
    (and ``native`` is not turned off), else the Python per-page fallback."""
    runs = native and pagecodec.why_not(backend) is None
    path = pagecodec.report(backend) if native else "Python per-page loop (native=False)"
    return EngineInfo(SOFTWARE_ENGINE, "software", True,
                      f"{why + '; ' if why else ''}backend {backend}; {path}", backend,
                      software.backend_version(backend, native), "native" if runs else "fallback")
