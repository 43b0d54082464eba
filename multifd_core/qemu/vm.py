"""Launch and drive a QEMU x86 guest that boots no OS, for tests and benchmarks.

The guest's RAM is a ``memory-backend-file`` (block name = the backend id ``mem``), so its
content can be seeded from a pattern file (``share=off``) or read back after a migration
(``share=on``); or, with ``anonymous``, a ``memory-backend-ram`` (same block name), the
ordinary anonymous memory a VM's ``-m`` gives, which benchmarks use. Every process is killed
by its PID on ``stop``; nothing is found by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multifd_core.errors import TransportError
from multifd_core.qemu.qmp import QMPClient

QEMU_BINARY = "qemu-system-x86_64"
MIN_VERSION = 10
INSTALL_HINT = "install QEMU >= 10: run scripts/setup-system.sh as root"


def qemu_binary() -> str | None:
    return shutil.which(os.environ.get("MULTIFD_QEMU", QEMU_BINARY))


def qemu_version(binary: str | None = None) -> tuple[int, int, int] | None:
    """QEMU's version, or None when it is not installed."""
    binary = binary or qemu_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def qemu_missing_reason() -> str | None:
    """None when a usable QEMU is installed, else why not (with the install hint)."""
    version = qemu_version()
    if version is None:
        return f"{QEMU_BINARY} not found; {INSTALL_HINT}"
    if version[0] < MIN_VERSION:
        return f"{QEMU_BINARY} {'.'.join(map(str, version))} is too old; {INSTALL_HINT}"
    return None


def default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass
class GuestConfig:
    """What both ends of a migration must agree on, plus how to start this end."""

    machine: str = "pc"
    mem_mib: int = 64
    ram_file: Path | None = None  # memory-backend-file mem-path
    share: bool = True
    #: memory-backend-ram instead (no file): never-written pages read as the zero page, where
    #: a private mapping of a sparse file makes the kernel allocate and zero a page-cache
    #: page for each one the migration reads.
    anonymous: bool = False
    paused: bool = True  # -S
    incoming: bool = False  # -incoming defer
    uuid: str | None = None
    loaders: list[tuple[Path, int]] = field(default_factory=list)  # (blob, guest address)
    accel: str = field(default_factory=default_accel)
    extra: list[str] = field(default_factory=list)


class QemuVM:
    """One QEMU process with its QMP monitor."""

    def __init__(self, workdir: Path, name: str, config: GuestConfig) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.config = config
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient | None = None

    def command_line(self) -> list[str]:
        c = self.config
        binary = qemu_binary()
        if binary is None:
            raise TransportError(qemu_missing_reason() or "no QEMU")
        if c.anonymous:
            backend = f"memory-backend-ram,id=mem,size={c.mem_mib}M"
        else:
            if c.ram_file is None:
                c.ram_file = self.workdir / f"{self.name}.ram"
            if not c.ram_file.exists():
                with open(c.ram_file, "wb") as f:
                    f.truncate(c.mem_mib << 20)
            backend = (f"memory-backend-file,id=mem,size={c.mem_mib}M,mem-path={c.ram_file},"
                       f"share={'on' if c.share else 'off'}")
        args = [
            binary, "-machine", f"{c.machine},memory-backend=mem", "-m", f"{c.mem_mib}M",
            "-object", backend,
            "-nodefaults", "-display", "none", "-accel", c.accel,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if c.paused:
            args.append("-S")
        if c.incoming:
            args += ["-incoming", "defer"]
        if c.uuid:
            args += ["-uuid", c.uuid]
        for blob, addr in c.loaders:
            args += ["-device", f"loader,file={blob},addr={addr:#x},force-raw=on"]
        return args + c.extra

    def start(self, *, timeout: float = 10.0) -> QemuVM:
        self.qmp_path.unlink(missing_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise TransportError(f"QEMU {self.name} exited with {self.proc.returncode}: "
                                     f"{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError(f"QEMU {self.name} did not open its monitor in {timeout}s")
            time.sleep(0.01)
        self.qmp = QMPClient(str(self.qmp_path), timeout=timeout).connect()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, timeout: float = 5.0) -> int | None:
        """Quit politely if QMP answers, else SIGKILL this PID. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=1.0)
            except Exception:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    # ---------------------------------------------------------------- migration set-up

    def set_migration(self, *, channels: int = 2, compression: str = "none",
                      zero_page_detection: str | None = None, return_path: bool = False,
                      events: bool = True, level: int | None = None,
                      max_bandwidth: int | None = 0) -> None:
        """Capabilities and parameters for a multifd migration (either end)."""
        assert self.qmp is not None
        caps = [{"capability": "multifd", "state": True}]
        if events:
            caps.append({"capability": "events", "state": True})
        if return_path:
            caps.append({"capability": "return-path", "state": True})
        self.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": compression}
        if zero_page_detection:
            params["zero-page-detection"] = zero_page_detection
        if max_bandwidth is not None:
            params["max-bandwidth"] = max_bandwidth
        if level is not None and compression in ("zlib", "zstd", "qatzip"):
            params[f"multifd-{compression}-level"] = level
        self.qmp.execute("migrate-set-parameters", params)

    def set_mapped_ram(self, *, channels: int | None = None, direct_io: bool = False,
                       events: bool = True) -> None:
        """Capabilities for a mapped-ram file migration (``file:PATH``, either end): mapped-ram,
        plus multifd with ``channels`` unless None; ``direct_io`` needs multifd."""
        assert self.qmp is not None
        caps = [{"capability": "mapped-ram", "state": True}]
        if channels is not None:
            caps.append({"capability": "multifd", "state": True})
        if events:
            caps.append({"capability": "events", "state": True})
        self.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {}
        if channels is not None:
            params["multifd-channels"] = channels
        if direct_io:
            params["direct-io"] = True
        if params:
            self.qmp.execute("migrate-set-parameters", params)

    def migrate_incoming(self, uri: str) -> None:
        assert self.qmp is not None
        self.qmp.execute("migrate-incoming", {"uri": uri, "exit-on-error": False})

    def migrate(self, uri: str) -> None:
        assert self.qmp is not None
        self.qmp.execute("migrate", {"uri": uri})

    def status(self) -> str:
        assert self.qmp is not None
        return self.qmp.execute("query-status")["status"]

    def ramblocks(self) -> dict[str, int]:
        """Migratable blocks and their used lengths, from ``x-query-ramblock``."""
        assert self.qmp is not None
        text = self.qmp.execute("x-query-ramblock")["human-readable-text"]
        out = {}
        for line in text.splitlines()[1:]:
            m = re.match(r"\s*(\S+)\s+\d+ \w+\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)", line)
            if m:
                out[m[1]] = int(m[2], 16)
        return out


def qemu_main_version() -> str:
    v = qemu_version()
    return ".".join(map(str, v)) if v else "none"
