"""Replay a capture into a real QEMU destination started with ``-incoming``.

The main stream is rebuilt: the captured header and configuration, a synthetic RAM START
(MEM_SIZE block list [+ MULTIFD_FLUSH] + EOS), optionally SWITCHOVER_START, a RAM END
([MULTIFD_FLUSH +] EOS), then the captured device tail verbatim. Every page goes through the
multifd channels (the engine's ``Sender``; zero pages as zero entries), between two SYNC rounds
that pair with the two sync points of the rebuilt stream: the FLUSHes in per-round mode, the
START and END EOS in per-section mode (mirroring the capture).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.engine.digest import manifest_digest
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.sender import Sender
from multifd_core.errors import MultiFDError, TransportError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.qemu import MANIFEST_FORMAT
from multifd_core.qemu import stream as qs
from multifd_core.session.report import Phases
from multifd_core.session.transport import Address, connect

log = logging.getLogger("multifd.qemu.replay")


class ReplayError(MultiFDError):
    """The capture cannot be replayed, or the destination went away."""


@dataclass
class Capture:
    """A capture directory, loaded and checked."""

    path: Path
    manifest: dict[str, Any]
    prefix: bytes
    tail: bytes
    blocks: list[RamBlock]
    #: For a source that sends only some pages (a mapped-ram file): ``pages(i)`` yields
    #: (first page, page numbers to send) slices of block ``i``; None sends every page.
    pages: Callable[[int], Iterable[tuple[int, np.ndarray]]] | None = None
    closer: Callable[[], None] | None = None

    @property
    def per_section(self) -> bool:
        return self.manifest["sync_mode"] == "per-section"

    def close(self) -> None:
        for b in self.blocks:
            b.close()
        if self.closer is not None:
            self.closer()


def load_capture(path: str | Path, *, verify: bool = True,
                 verify_blocks: bool | None = None) -> Capture:
    """Read ``manifest.json`` and its files; with ``verify``, check the prefix's and tail's
    digests and (unless ``verify_blocks`` is false: ``replay(verify=True)`` checks them while
    it sends) every block's."""
    verify_blocks = verify if verify_blocks is None else verify_blocks
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ReplayError(f"{path}: no manifest.json (not a finished capture)") from None
    except json.JSONDecodeError as exc:
        raise ReplayError(f"{path}/manifest.json: {exc}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ReplayError(f"{path}: manifest format {manifest.get('format')!r}, expected "
                          f"{MANIFEST_FORMAT!r} (made by `multifd qemu capture`)")
    page_size = int(manifest.get("page_size", 4096))
    prefix = _read_checked(path, manifest["prefix"], verify)
    tail = _read_checked(path, manifest["tail"], verify)
    qs.split_tail(tail)  # the tail must end with EOF (+ vmdesc)
    blocks = []
    for entry in manifest["blocks"]:
        block = RamBlock.from_file(path / entry["file"], entry["name"], page_size=page_size)
        if block.used_length != entry["length"]:
            raise ReplayError(f"{entry['file']}: {block.used_length} bytes, manifest says "
                              f"{entry['length']}")
        blocks.append(block)
        if verify_blocks:
            _check_block(block, entry)
    return Capture(path, manifest, prefix, tail, blocks)


def _check_block(block: RamBlock, entry: dict[str, Any]) -> None:
    algorithm, want = manifest_digest(entry)
    if block.digest(algorithm) != want:
        raise ReplayError(f"{entry['file']}: {algorithm} differs from the manifest")


class _BlockCheck:
    """The blocks' digests checked in a thread while the pages are sent; ``wait`` raises
    before the device state goes, so a destination never completes from a bad capture."""

    def __init__(self, capture: Capture) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(capture,), daemon=True,
                                        name="replay-verify")
        self._thread.start()

    def _run(self, capture: Capture) -> None:
        try:
            for block, entry in zip(capture.blocks, capture.manifest["blocks"], strict=True):
                _check_block(block, entry)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ReplayError(f"the capture's digests were not checked within {timeout} s")
        if self._error is not None:
            raise self._error


def _read_checked(path: Path, entry: dict[str, Any], verify: bool) -> bytes:
    data = (path / entry["file"]).read_bytes()
    if len(data) != entry["length"] or (
            verify and hashlib.sha256(data).hexdigest() != entry["sha256"]):
        raise ReplayError(f"{path / entry['file']}: length or sha256 differs from the manifest")
    return data


@dataclass
class ReplayStats:
    seconds: float
    main_bytes: int
    wire_bytes: int
    normal_pages: int
    zero_pages: int
    packets_per_channel: list[int]
    #: Seconds per phase: connecting, transferring (the RAM, to its last SYNC), verifying
    #: (waiting for the digest check to finish), device state (the tail sent until the
    #: destination closed the stream, having loaded everything).
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def replay(capture: Capture, address: Address, *, channels: int, method: str = "none",
           level: int | None = None, uuid: bytes = bytes(16), timeout: float = 60.0,
           switchover_start: bool | None = None, registry: MethodRegistry | None = None,
           verify: bool = False) -> ReplayStats:
    """Send ``capture`` to a QEMU destination listening at ``address``.

    With ``verify``, every block's digest is checked against the manifest while the pages go
    (load it with ``verify_blocks=False``); a mismatch fails the replay before the device state
    is sent, so the destination does not complete.

    ``uuid`` is the destination's ``-uuid`` (zeros when it has none): QEMU checks the channel
    init packets against its own UUID, not the captured source's.
    """
    registry = registry or default_registry()
    page_size = int(capture.manifest.get("page_size", 4096))
    meth = registry.create(method, MethodOptions(page_size=page_size, level=level))
    sid = int(capture.manifest.get("ram_section_id", 1))
    flush = not capture.per_section
    if switchover_start is None:
        switchover_start = bool(capture.manifest.get("switchover_start"))
    infos = [qs.BlockInfo(b.name, b.used_length) for b in capture.blocks]
    t0 = time.perf_counter()
    phases = Phases(log)
    phases.enter("connecting")
    main = connect(address, timeout=timeout)
    socks: list[socket.socket] = [main]
    sender: Sender | None = None
    main_bytes = 0

    def send_main(data: bytes) -> None:
        nonlocal main_bytes
        try:
            main.sendall(data)
        except OSError as exc:
            raise TransportError(f"the destination closed the main connection ({exc}); see "
                                 "its query-migrate error-desc") from None
        main_bytes += len(data)

    check = _BlockCheck(capture) if verify else None
    try:
        main.settimeout(timeout)
        send_main(capture.prefix)  # at once: the destination peeks the first bytes
        for _ in range(channels):
            socks.append(connect(address, timeout=timeout))
        sender = Sender(meth, socks[1:], page_size=page_size, uuid=uuid, timeout=timeout)
        phases.enter("transferring")
        send_main(qs.ram_start_section(sid, infos, flush=flush))
        sender.sync()  # pairs with the START FLUSH (or EOS): no page before load setup
        for i, block in enumerate(capture.blocks):
            if capture.pages is None:
                sender.queue_pages(block)
                continue
            for _, index in capture.pages(i):
                if len(index):
                    sender.queue_pages(block, index)
        sender.sync()  # pairs with the END FLUSH (or EOS)
        if check is not None:
            phases.enter("verifying")
            check.wait(timeout)
        phases.enter("device state")
        if switchover_start:
            send_main(qs.encode_command(qs.CMD_SWITCHOVER_START))
        send_main(qs.ram_end_section(sid, flush=flush))
        send_main(capture.tail)
        _wait_eof(main, timeout)
        stats = sender.close()
    except BaseException:
        if sender is not None:
            err = sender._error
            sender.abort()
            if isinstance(err, MultiFDError):
                raise err from None
        raise
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
    return ReplayStats(seconds=time.perf_counter() - t0, main_bytes=main_bytes,
                       wire_bytes=stats.wire_bytes + main_bytes,
                       normal_pages=stats.normal_pages, zero_pages=stats.zero_pages,
                       packets_per_channel=stats.packets_per_channel,
                       phases=phases.finish())


def _wait_eof(main: socket.socket, timeout: float) -> None:
    """The destination closes the main socket once it has loaded everything."""
    deadline = time.monotonic() + timeout
    main.settimeout(0.5)
    while True:
        try:
            data = main.recv(4096)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TransportError(f"the destination did not close the main stream within "
                                     f"{timeout} s after the device state") from None
            continue
        except ConnectionResetError:
            return
        if not data:
            return
        # A destination with a return path may send messages; nothing to answer in precopy.
