"""Helpers for the QEMU tests: guests that boot no OS, killed by PID; recorded vectors.

Without QEMU >= 10 the live tests skip locally with the install hint, and fail under CI=true.
"""

from __future__ import annotations

import gzip
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multifd_core.engine.digest import digest_of, manifest_digest
from multifd_core.methods.registry import default_registry
from multifd_core.qemu.capture import QemuCapture
from multifd_core.qemu.vm import GuestConfig, QemuVM, qemu_missing_reason

DATA = Path(__file__).parent / "data"
MIB = 64


def require_qemu() -> None:
    reason = qemu_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def require_method(name: str) -> None:
    if name in default_registry():
        return
    msg = f"method {name} not installed: pip install -e plugins/{name}"
    if os.environ.get("CI"):
        pytest.fail(f"CI: {msg}")
    pytest.skip(msg)


def sha(path: Path) -> str:
    """A file's digest as a manifest records it for a block (``engine.digest``'s default)."""
    return digest_of(path.read_bytes())


def block_digest(entry: dict[str, Any]) -> str:
    """The digest a manifest records for a block, whichever algorithm it uses."""
    return manifest_digest(entry)[1]


def differing_pages(a: Path, b: Path) -> list[int]:
    x = np.fromfile(a, dtype=np.uint8).reshape(-1, 4096)
    y = np.fromfile(b, dtype=np.uint8).reshape(-1, 4096)
    return np.flatnonzero((x != y).any(axis=1)).tolist()


# A running source guest (KVM) may have set up state whose load on the destination rewrites
# a few bytes of the BIOS area (observed: page 0xE8, 2 bytes, also QEMU->QEMU with zlib).
BIOS_AREA = range(0xC0, 0x100)


def assert_same_ram(dst: Path, src: Path, *, running: bool) -> None:
    """A destination's RAM equals the source's (a running source: up to 2 pages of the BIOS
    area may differ, as for QEMU->QEMU)."""
    diff = differing_pages(dst, src)
    if running:
        assert len(diff) <= 2 and all(p in BIOS_AREA for p in diff), diff
    else:
        assert diff == []


def incoming_port(vm: QemuVM, channels: int, method: str = "none") -> str:
    vm.set_migration(channels=channels, compression=method)
    vm.migrate_incoming("tcp:127.0.0.1:0")
    assert vm.qmp is not None
    addr = vm.qmp.execute("query-migrate")["socket-address"][0]
    return f"tcp:127.0.0.1:{addr['port']}"


def read_vector(name: str) -> bytes:
    with gzip.open(DATA / name, "rb") as f:
        return f.read()


@dataclass
class Lab:
    """Starts guests in ``workdir`` and kills every one of them at teardown."""

    workdir: Path
    pattern: Path
    vms: list[QemuVM]

    def source(self, name: str = "src", **kw: Any) -> QemuVM:
        """A source whose RAM is a private copy of the pattern, shared so that the file
        holds the final RAM after the migration."""
        ram = self.workdir / f"{name}.ram"
        shutil.copyfile(self.pattern, ram)
        kw.setdefault("share", True)
        return self.start(name, GuestConfig(ram_file=ram, mem_mib=MIB, **kw))

    def destination(self, name: str = "dst", **kw: Any) -> QemuVM:
        ram = self.workdir / f"{name}.ram"
        ram.unlink(missing_ok=True)
        return self.start(name, GuestConfig(ram_file=ram, mem_mib=MIB, incoming=True, **kw))

    def start(self, name: str, config: GuestConfig) -> QemuVM:
        vm = QemuVM(self.workdir, name, config)
        self.vms.append(vm)
        return vm.start()


class CaptureThread:
    """Runs ``QemuCapture.run`` in a thread; ``result()`` returns the manifest or raises."""

    def __init__(self, cap: QemuCapture) -> None:
        self.cap = cap
        self.manifest: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.manifest = self.cap.run()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "capture did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.manifest is not None
        return self.manifest
