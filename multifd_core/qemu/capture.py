"""Capture a real QEMU's outgoing multifd migration: be its destination, keep everything.

The capture listens on one TCP address, classifies each connection by its first 4 bytes
(``QEVM``: main; anything else: a multifd channel, handed to the engine's ``Receiver``), and
parses the main stream with ``MainStreamReader``. Sync points run the Receiver's barrier:
every MULTIFD_FLUSH, or every RAM EOS when the source is in per-section mode (no FLUSH in the
RAM START section: machine types <= 8.0). Legacy ZERO/PAGE records on main are applied in
stream order between barriers. The device tail is kept verbatim. ``manifest.json`` is written
last, and only when everything was received and checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multifd_core.errors import MultiFDError, TransportError
from multifd_core.method import MethodOptions
from multifd_core.qemu import stream as qs
from multifd_core.ram import RamBlock
from multifd_core.receiver import Receiver
from multifd_core.registry import MethodRegistry, default_registry
from multifd_core.session import PARTIAL, FileOutput
from multifd_core.wire import InitPacket, format_uuid

log = logging.getLogger("multifd.qemu.capture")

PREFIX_FILE = "prefix.bin"
TAIL_FILE = "tail.bin"
VMDESC_FILE = "vmdesc.json"
MANIFEST_FORMAT = "multifd-qemu-capture"
_POLL = 0.2


class CaptureError(MultiFDError):
    """The capture could not take the migration (the source's stream or the session)."""


@dataclass
class CaptureStats:
    seconds: float = 0.0
    main_bytes: int = 0
    main_zero_pages: int = 0
    main_normal_pages: int = 0
    flushes: int = 0
    ram_sections: int = 0
    sync_rounds: int = 0
    channels: list[dict[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        ch = self.channels
        normal = sum(c["normal_pages"] for c in ch) + self.main_normal_pages
        zero = sum(c["zero_pages"] for c in ch) + self.main_zero_pages
        wire = sum(c["wire_bytes"] for c in ch) + self.main_bytes
        return {
            "seconds": round(self.seconds, 6), "main_bytes": self.main_bytes,
            "main_zero_pages": self.main_zero_pages, "main_normal_pages": self.main_normal_pages,
            "flushes": self.flushes, "ram_sections": self.ram_sections,
            "sync_rounds": self.sync_rounds, "normal_pages": normal, "zero_pages": zero,
            "wire_bytes": wire,
            "throughput_bytes_per_s": round(wire / self.seconds) if self.seconds else 0,
            "channels": ch,
        }


class QemuCapture:
    """One capture session. ``listen()`` then ``run()``; ``run`` returns the manifest."""

    def __init__(self, out_dir: str | os.PathLike[str], *, channels: int,
                 method: str = "none", level: int | None = None, uuid: bytes | None = None,
                 timeout: float = 60.0, channel_grace: float = 5.0, page_size: int = 4096,
                 registry: MethodRegistry | None = None,
                 wait_first: float | None = None) -> None:
        if not 1 <= channels <= 255:
            raise CaptureError(f"--channels {channels} out of range 1..255")
        self.out_dir = Path(out_dir)
        self.channels = channels
        self.registry = registry or default_registry()
        self.method_name = method
        self.method = self.registry.create(method, MethodOptions(page_size=page_size, level=level))
        self.expected_uuid = uuid
        self.timeout = timeout
        #: How long to wait for the first connection (``math.inf``: as long as it takes).
        self.wait_first = timeout if wait_first is None else wait_first
        self.channel_grace = channel_grace
        self.page_size = page_size
        self.listener: socket.socket | None = None
        self.receiver: Receiver | None = None
        self.source_uuid: bytes | None = None
        self.stats = CaptureStats()
        self._lock = threading.Lock()
        self._main_q: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._main: socket.socket | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._acceptor: threading.Thread | None = None

    # ------------------------------------------------------------------ connections

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port)."""
        try:
            sock = socket.create_server((host, port), backlog=self.channels + 8)
        except OSError as exc:
            raise TransportError(f"cannot listen on tcp:{host}:{port}: "
                                 f"{exc.strerror or exc}") from None
        self.listener = sock
        return sock.getsockname()[:2]

    def _accept_loop(self) -> None:
        assert self.listener is not None
        self.listener.settimeout(_POLL)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._socks.append(conn)
            threading.Thread(target=self._classify, args=(conn,), daemon=True,
                             name="qemu-capture-classify").start()

    def _classify(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.timeout)
            try:
                magic = conn.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
            except TimeoutError:
                raise TransportError(f"a connection sent nothing for {self.timeout} s") from None
            if len(magic) < 4:
                conn.close()  # a probe that connected and left
                return
            if magic == b"QEVM":
                with self._lock:
                    if self._main is not None:
                        raise CaptureError("a second main connection (QEVM) arrived")
                    self._main = conn
                self._main_q.put(conn)
                return
            receiver = self.receiver
            assert receiver is not None
            init = receiver.read_init(conn)
            self._check_uuid(init)
            receiver.accept_channel(conn, init)
        except BaseException as exc:
            self._fail(exc)

    def _check_uuid(self, init: InitPacket) -> None:
        """The first channel's UUID is the source's (unless --uuid fixed it); the Receiver
        then checks every channel against it."""
        assert self.receiver is not None
        with self._lock:
            if self.source_uuid is None:
                self.source_uuid = init.uuid
                self.receiver.uuid = init.uuid if self.expected_uuid is None \
                    else self.expected_uuid

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
        if self.receiver is not None:
            self.receiver.fail(exc)
        main = self._main
        if main is not None:
            try:
                main.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _root_cause(self, exc: BaseException) -> BaseException:
        """The first failure: a connection's, a channel's, or ``exc`` itself."""
        for err in (self._error, self.receiver.error if self.receiver else None):
            if err is not None and err is not exc and isinstance(err, MultiFDError):
                return err
        return exc

    def _check(self) -> None:
        err = self._error
        if err is None and self.receiver is not None:
            err = self.receiver.error
        if err is not None:
            if isinstance(err, MultiFDError):
                raise err
            raise CaptureError(f"capture failed: {err!r}") from err

    # ------------------------------------------------------------------ the session

    def run(self) -> dict[str, Any]:
        """Take one migration; return the manifest (also written to ``manifest.json``)."""
        if self.listener is None:
            self.listen()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "manifest.json").unlink(missing_ok=True)
        self.receiver = Receiver(self.method, channels=self.channels, page_size=self.page_size,
                                 uuid=self.expected_uuid or bytes(16), timeout=self.timeout)
        output = FileOutput(self.out_dir)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="qemu-capture-accept")
        self._acceptor.start()
        ok = False
        try:
            manifest = self._session(output)
            ok = True
            return manifest
        except BaseException as exc:
            root = self._root_cause(exc)
            self._fail(exc)
            if root is not exc:
                raise root from None
            raise
        finally:
            self._stop.set()
            if self.listener is not None:
                self.listener.close()
            if self._acceptor is not None:
                self._acceptor.join(2)
            if self.receiver is not None:
                if not ok:
                    self.receiver.abort(CaptureError("capture aborted"))
                self.receiver.close()
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass
            output.close()
            if not ok:
                for _, fname, _, _ in output.files:
                    try:
                        os.unlink(self.out_dir / (fname + PARTIAL))
                    except OSError:
                        pass

    def _wait_main(self) -> socket.socket:
        """``wait_first`` for a first connection, then ``timeout`` from it for the main one."""
        deadline, limit = time.monotonic() + self.wait_first, self.wait_first
        while True:
            self._check()
            try:
                return self._main_q.get(timeout=_POLL)
            except queue.Empty:
                if self._socks and limit == self.wait_first:
                    deadline = min(deadline, time.monotonic() + self.timeout)
                    limit = min(limit, self.timeout)
                if time.monotonic() > deadline:
                    raise TransportError(f"no main connection (QEVM) within {limit} s; "
                                         "is the source migrating to this address?") from None

    def _wait_channels(self) -> None:
        """QEMU loads the main stream only once every channel is in; so do we."""
        assert self.receiver is not None
        deadline = time.monotonic() + self.channel_grace
        while self.receiver.connected < self.channels:
            self._check()
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"the source opened {self.receiver.connected} multifd channel(s), expected "
                    f"{self.channels} (--channels must equal the source's multifd-channels)")
            time.sleep(0.01)

    def _session(self, output: FileOutput) -> dict[str, Any]:
        assert self.receiver is not None
        receiver = self.receiver
        main = self._wait_main()
        t0 = time.perf_counter()
        main.settimeout(_POLL)
        reader = qs.MainStreamReader(page_size=self.page_size)
        tail_path = self.out_dir / (TAIL_FILE + PARTIAL)
        tail = bytearray()
        blocks: dict[str, RamBlock] = {}
        per_section: bool | None = None
        return_path = False
        shut_sent = False
        switchover = False
        last_data = time.monotonic()
        buf = bytearray(1 << 20)
        while True:
            self._check()
            try:
                n = main.recv_into(buf)
            except TimeoutError:
                if time.monotonic() - last_data > self.timeout:
                    raise TransportError(f"main stream: no data for {self.timeout} s") from None
                continue
            except OSError as exc:
                self._check()
                raise TransportError(f"main stream: {exc}") from None
            last_data = time.monotonic()
            if n == 0:
                break
            self.stats.main_bytes += n
            reader.feed(memoryview(buf)[:n])
            receiver.touch()
            for ev in reader.events():
                if isinstance(ev, qs.TailData):
                    tail += ev.data
                    if return_path and not shut_sent and qs.tail_complete(bytes(tail)):
                        main.sendall(qs.shut(0))
                        shut_sent = True
                elif isinstance(ev, qs.RamPage):
                    _apply_main_page(blocks, ev, self.page_size, self.stats)
                    receiver.mark_received(ev.block, np.array([ev.offset // self.page_size]))
                elif isinstance(ev, qs.Flush):
                    self.stats.flushes += 1
                    self._sync(receiver)
                elif isinstance(ev, qs.Eos):
                    if per_section is None:
                        per_section = reader.flushes == 0
                    if per_section:
                        self._sync(receiver)
                elif isinstance(ev, qs.SectionHeader):
                    self.stats.ram_sections += 1
                elif isinstance(ev, qs.MemSize):
                    self._wait_channels()
                    for info in ev.blocks:
                        if info.length > 1 << 40:
                            raise CaptureError(f"ramblock {info.name}: length {info.length} "
                                               "is beyond 1 TiB")
                        blocks[info.name] = output.allocate(info.name, info.length,
                                                            self.page_size)
                    receiver.set_blocks(blocks.values())
                elif isinstance(ev, qs.Command):
                    if ev.cmd == qs.CMD_OPEN_RETURN_PATH:
                        return_path = True
                    elif ev.cmd == qs.CMD_PING:
                        if not return_path:
                            raise CaptureError("PING command before OPEN_RETURN_PATH")
                        main.sendall(qs.pong(ev.data))
                    elif ev.cmd == qs.CMD_SWITCHOVER_START:
                        switchover = True
        try:
            reader.close()
            device, vmdesc = qs.split_tail(bytes(tail))
        except qs.StreamError as exc:
            raise CaptureError(f"the source's main stream ended early or badly: {exc}") from None
        # QEMU always sends the vmdesc in precopy; without it a cut inside the device state
        # that happens to end on a 00 byte would pass for the EOF marker.
        if vmdesc is None:
            raise CaptureError("the source's main stream ended without the vmdesc after the "
                               "device state (closed early?)")
        try:
            json.loads(vmdesc)
        except ValueError as exc:
            raise CaptureError(f"the vmdesc JSON does not parse: {exc}") from None
        # A 9.0-9.2 source leaves one unpaired SYNC per channel: release it.
        receiver.release_all()
        receiver.finish()
        self.stats.seconds = time.perf_counter() - t0
        self.stats.sync_rounds = receiver.rounds
        self.stats.channels = [dict(vars(s)) for s in receiver.stats]
        if return_path and not shut_sent:
            raise CaptureError("the return path was opened but the vmdesc never completed")
        return self._commit(output, reader, blocks, bytes(tail), tail_path, vmdesc,
                            per_section=bool(per_section), return_path=return_path,
                            switchover=switchover)

    def _sync(self, receiver: Receiver) -> None:
        receiver.sync_round()

    # ------------------------------------------------------------------ output

    def _commit(self, output: FileOutput, reader: qs.MainStreamReader,
                blocks: dict[str, RamBlock], tail: bytes, tail_path: Path,
                vmdesc: bytes | None, *, per_section: bool, return_path: bool,
                switchover: bool) -> dict[str, Any]:
        pro = reader.prologue
        assert pro is not None and reader.tail_offset is not None
        (self.out_dir / PREFIX_FILE).write_bytes(pro.raw)
        tail_path.write_bytes(tail)
        os.replace(tail_path, self.out_dir / TAIL_FILE)
        if vmdesc is not None:
            (self.out_dir / VMDESC_FILE).write_bytes(vmdesc)
        else:
            (self.out_dir / VMDESC_FILE).unlink(missing_ok=True)
        digests = {name: b.sha256() for name, b in blocks.items()}
        stats = self.stats.as_dict()
        zpd = "legacy" if self.stats.main_zero_pages else (
            "multifd" if stats["zero_pages"] else "none or no zero pages")
        extra = {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "machine": pro.machine,
            "uuid": format_uuid(self.source_uuid or bytes(16)),
            "configuration": {"capabilities": list(pro.capabilities),
                              "uuid": format_uuid(pro.uuid) if pro.uuid else None,
                              "target_page_bits": pro.target_page_bits},
            "method": self.method_name,
            "channels": self.channels,
            "page_size": self.page_size,
            "sync_mode": "per-section" if per_section else "per-round",
            "return_path": return_path,
            "switchover_start": switchover,
            "zero_page_detection": zpd,
            "ram_section_id": reader.ram_section_id,
            "commands": [c.name for c in reader.commands],
            "prefix": {"file": PREFIX_FILE, "length": len(pro.raw),
                       "sha256": hashlib.sha256(pro.raw).hexdigest()},
            "tail": {"file": TAIL_FILE, "offset": reader.tail_offset, "length": len(tail),
                     "sha256": hashlib.sha256(tail).hexdigest(),
                     "device_bytes": len(tail) - (len(vmdesc) + 5 if vmdesc is not None else 0)},
            "vmdesc": None if vmdesc is None else {"file": VMDESC_FILE, "length": len(vmdesc)},
            "statistics": stats,
        }
        output.commit(digests, extra)
        return json.loads((self.out_dir / "manifest.json").read_text())


def _apply_main_page(blocks: dict[str, RamBlock], ev: qs.RamPage, page_size: int,
                     stats: CaptureStats) -> None:
    block = blocks.get(ev.block)
    if block is None:  # the reader checked the name against MEM_SIZE already
        raise CaptureError(f"main-channel page for ramblock {ev.block} before MEM_SIZE")
    view = block.array[ev.offset : ev.offset + page_size]
    if ev.data is None:
        stats.main_zero_pages += 1
        if view.any():  # keep never-written pages sparse
            view[:] = 0
    else:
        stats.main_normal_pages += 1
        view[:] = np.frombuffer(ev.data, dtype=np.uint8)
