"""Fixtures for tests against a real QEMU (helpers live in qemu_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu_support import MIB, CaptureThread, Lab, require_qemu

from multifd_core.qemu.capture import QemuCapture


@pytest.fixture(scope="session")
def pattern_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB: every third page zero, the others random (fixed seed)."""
    path = tmp_path_factory.mktemp("pattern") / "pattern.bin"
    rng = np.random.default_rng(1234)
    pages = rng.integers(0, 256, size=((MIB << 20) // 4096, 4096), dtype=np.uint8)
    pages[::3] = 0
    path.write_bytes(pages.tobytes())
    return path


@pytest.fixture
def lab(tmp_path: Path, pattern_file: Path) -> Iterator[Lab]:
    require_qemu()
    lab = Lab(tmp_path, pattern_file, [])
    try:
        yield lab
    finally:
        for vm in lab.vms:
            try:
                vm.stop(timeout=3)
            except Exception:
                vm.kill()


@pytest.fixture
def start_capture(tmp_path: Path) -> Callable[..., tuple[CaptureThread, str]]:
    """Start a capture listening on 127.0.0.1:0; returns (thread, "tcp:127.0.0.1:PORT")."""
    def start(out: str = "cap", **kw: Any) -> tuple[CaptureThread, str]:
        kw.setdefault("timeout", 20.0)
        cap = QemuCapture(tmp_path / out, **kw)
        host, port = cap.listen("127.0.0.1", 0)
        return CaptureThread(cap), f"tcp:{host}:{port}"
    return start
