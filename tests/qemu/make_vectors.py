"""Record real QEMU main streams (and small channels) into tests/qemu/data.

Run by hand: ``.venv/bin/python tests/qemu/make_vectors.py [NAME ...]`` (the names of the
cases to record; all of them without). A plain socket listener takes the source's connections
and saves each one's bytes; it never writes back, so return-path streams cannot be recorded
this way.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from multifd_core.qemu.vm import GuestConfig, QemuVM

DATA = Path(__file__).parent / "data"


def record(workdir: Path, config: GuestConfig, *, channels: int, zpd: str | None,
           timeout: float = 30.0) -> list[bytes]:
    """Migrate a source into a raw listener; return [main, channel streams...]."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=channels + 1)
    port = lsock.getsockname()[1]
    lsock.settimeout(timeout)
    streams: list[bytearray] = []

    def drain(conn: socket.socket, out: bytearray) -> None:
        conn.settimeout(timeout)
        while chunk := conn.recv(1 << 20):
            out += chunk

    threads = []
    src = QemuVM(workdir, "rec", config).start()
    try:
        src.set_migration(channels=channels, zero_page_detection=zpd)
        src.migrate(f"tcp:127.0.0.1:{port}")
        for _ in range(channels + 1):
            conn, _ = lsock.accept()
            buf = bytearray()
            streams.append(buf)
            t = threading.Thread(target=drain, args=(conn, buf), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout)
        info = src.qmp.wait_migration(timeout=timeout)
        assert info["status"] == "completed", info
    finally:
        src.stop()
        lsock.close()
    main = [s for s in streams if s[:4] == b"QEVM"]
    rest = sorted((s for s in streams if s[:4] != b"QEVM"), key=lambda s: s[24])
    return [bytes(b) for b in main + rest]


def pattern(path: Path, mib: int, data_pages: int | None = None, seed: int = 1) -> None:
    """Every third page zero, the others random; or only ``data_pages`` random pages."""
    rng = np.random.default_rng(seed)
    n = (mib << 20) // 4096
    if data_pages is None:
        pages = rng.integers(0, 256, size=(n, 4096), dtype=np.uint8)
        pages[::3] = 0
    else:
        pages = np.zeros((n, 4096), dtype=np.uint8)
        idx = rng.choice(n, size=data_pages, replace=False)
        pages[idx] = rng.integers(1, 256, size=(data_pages, 4096), dtype=np.uint8)
    path.write_bytes(pages.tobytes())


def main() -> int:
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        pattern(w / "full.bin", 64)
        pattern(w / "sparse.bin", 64, data_pages=40)
        cases = {
            # name: (config, channels, zero-page-detection, keep channels?)
            "pc-10.0-paused": (GuestConfig(machine="pc", share=False,
                                           ram_file=w / "full.bin"), 2, None, False),
            "q35-10.0-running": (GuestConfig(machine="q35", share=False, paused=False,
                                             ram_file=w / "full.bin"), 2, None, False),
            "pc-8.0-legacy": (GuestConfig(machine="pc-i440fx-8.0", share=False,
                                          ram_file=w / "full.bin"), 2, None, False),
            "pc-10.0-legacy-running": (GuestConfig(machine="pc", share=False, paused=False,
                                                   ram_file=w / "sparse.bin"), 2, "legacy",
                                       False),
            "pc-10.0-sparse": (GuestConfig(machine="pc", share=False,
                                           ram_file=w / "sparse.bin"), 2, None, True),
            # Machine type 8.0: per-section sync (a SYNC per channel at every RAM EOS) and
            # legacy zero pages (on the main stream).
            "pc-8.0-sparse": (GuestConfig(machine="pc-i440fx-8.0", share=False,
                                          ram_file=w / "sparse.bin"), 2, None, True),
        }
        wanted = sys.argv[1:] or list(cases)
        unknown = set(wanted) - set(cases)
        if unknown:
            sys.exit(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(cases)}")
        for name in wanted:
            config, channels, zpd, keep = cases[name]
            streams = record(w, config, channels=channels, zpd=zpd)
            with gzip.open(DATA / f"{name}.main.gz", "wb") as f:
                f.write(streams[0])
            print(name, "main", len(streams[0]), [len(s) for s in streams[1:]])
            if keep:
                for i, s in enumerate(streams[1:]):
                    with gzip.open(DATA / f"{name}.ch{i}.gz", "wb") as f:
                        f.write(s)
                # A -S source with share=off RAM sends the pattern file's bytes.
                assert config.ram_file is not None
                digest = hashlib.sha256(config.ram_file.read_bytes()).hexdigest()
                (DATA / f"{name}.json").write_text(json.dumps(
                    {"channels": channels, "mem_sha256": digest}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
