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

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.receiver import Receiver
from multifd_core.engine.writeback import Writeback
from multifd_core.errors import MultiFDError, TransportError, io_error
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.qemu import MANIFEST_FORMAT
from multifd_core.qemu import stream as qs
from multifd_core.session.limits import DEFAULT_MAX_MEMORY, check_receive_memory, ensure_open_files
from multifd_core.session.outdir import PARTIAL, FileOutput, printable
from multifd_core.session.report import Phases
from multifd_core.session.transport import ConnectionGate, Refusals, accept_until
from multifd_core.wire import INIT_LEN, InitPacket, decode_init, format_uuid, validate_init
from multifd_core.wire import MAGIC as MULTIFD_MAGIC
from multifd_core.wire import VERSION as MULTIFD_VERSION

log = logging.getLogger("multifd.qemu.capture")

PREFIX_FILE = "prefix.bin"
TAIL_FILE = "tail.bin"
VMDESC_FILE = "vmdesc.json"
QEVM = b"QEVM"
#: Seconds a new connection has, at most, to send its opening bytes.
HANDSHAKE_TIMEOUT = 10.0
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
    #: Seconds per phase until the digests (transferring, finishing, hashing+durable).
    phases: dict[str, float] = field(default_factory=dict)

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
            "channels": ch, "phases": self.phases,
        }


class QemuCapture:
    """One capture session. ``listen()`` then ``run()``; ``run`` returns the manifest.

    Connections are judged as QEMU's destination would, except that a stranger never fails
    the capture: each connection has ``handshake_timeout`` seconds to send its opening bytes
    (``QEVM``, or a 64-byte multifd init packet); the first ``QEVM`` connection is the main
    channel; multifd channels are grouped by the uuid of their init packets and the first
    group that brings every channel id ``0..channels-1`` is the source's (``uuid`` pins it
    instead). Everything else is refused, logged and listed in ``rejected``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, channels: int,
                 method: str = "none", level: int | None = None, uuid: bytes | None = None,
                 timeout: float = 60.0, channel_grace: float = 5.0, page_size: int = 4096,
                 registry: MethodRegistry | None = None,
                 handshake_timeout: float | None = None,
                 max_memory: int = DEFAULT_MAX_MEMORY,
                 mapped_ram: str | os.PathLike[str] | None = None,
                 wait_first: float | None = None) -> None:
        if not 1 <= channels <= 255:
            raise CaptureError(f"--channels {channels} out of range 1..255")
        self.out_dir = Path(out_dir)
        #: Write a mapped-ram file there instead of a capture directory (``--mapped-ram``).
        self.mapped_ram = mapped_ram
        self.channels = channels
        self.registry = registry or default_registry()
        self.method_name = method
        self.method = self.registry.create(method, MethodOptions(page_size=page_size, level=level))
        check_receive_memory(self.method, channels, max_memory)
        self.expected_uuid = uuid
        self.timeout = timeout
        #: How long to wait for the first connection (``math.inf``: as long as it takes).
        self.wait_first = timeout if wait_first is None else wait_first
        self.channel_grace = channel_grace
        self.handshake_timeout = (min(timeout, HANDSHAKE_TIMEOUT) if handshake_timeout is None
                                  else handshake_timeout)
        self.page_size = page_size
        self.listener: socket.socket | None = None
        self.receiver: Receiver | None = None
        self.source_uuid: bytes | None = None
        self.stats = CaptureStats()
        self._reject = Refusals(log)
        self.rejected = self._reject.reasons
        self._lock = threading.Lock()
        self._main_q: queue.SimpleQueue[tuple[socket.socket, bytes]] = queue.SimpleQueue()
        self._main: socket.socket | None = None
        self._groups: dict[bytes, dict[int, socket.socket]] = {}
        self._beyond: dict[bytes, InitPacket] = {}  # a channel id >= channels, per uuid
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._writeback = Writeback([])
        self._gate: ConnectionGate | None = None
        self._phases = Phases(log)

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
        try:
            gate = ConnectionGate(self.listener, _opening_len, reject=self._reject,
                                  handshake_timeout=self.handshake_timeout,
                                  max_pending=2 * self.channels + 16)
        except OSError as exc:
            self._fail(TransportError(f"cannot accept connections: {exc.strerror or exc}"))
            return
        self._gate = gate
        try:
            accept_until(gate, self._classify, self._stop.is_set)
        except MultiFDError as exc:  # the source's own channel breaks a rule
            self._fail(exc)
        except Exception as exc:  # never leave the session waiting on a dead acceptor
            self._fail(TransportError(f"accepting connections failed: {exc!r}"))
        finally:
            gate.close()

    def _classify(self, sock: socket.socket, head: bytes) -> None:
        if head == QEVM:
            with self._lock:
                if self._main is not None:
                    self._reject(sock, "a second main connection (QEVM); the first is kept")
                    return
                self._main = sock
            self._main_q.put((sock, head))
            return
        init = decode_init(head)
        if init.magic != MULTIFD_MAGIC or init.version != MULTIFD_VERSION:
            self._reject(sock, f"not a QEMU migration connection (first bytes {head[:8].hex()}"
                               f", expected {QEVM.hex()} or a multifd init packet)")
            return
        if self.expected_uuid is not None and init.uuid != self.expected_uuid:
            self._reject(sock, f"multifd channel with uuid {format_uuid(init.uuid)}, expected "
                               f"{format_uuid(self.expected_uuid)} (--uuid)")
            return
        self._candidate(sock, init)

    def _candidate(self, sock: socket.socket, init: InitPacket) -> None:
        """Hold a channel in its uuid's group; the first whole group is the source's.

        A channel of the source's uuid that QEMU's destination would refuse (an id beyond
        ``--channels``, or one already set up) fails the capture with QEMU's message: the
        source is set up differently from the capture. Other strangers are only refused."""
        if self.source_uuid is not None:
            if init.uuid == self.source_uuid:
                sock.close()
                validate_init(init, uuid=init.uuid, channels=self.channels,
                              seen=set(range(self.channels)))
            self._reject(sock, f"multifd channel {init.channel_id} after all {self.channels} "
                               "channels of the source connected")
            return
        if init.channel_id >= self.channels:
            self._beyond.setdefault(init.uuid, init)
            self._reject(sock, f"multifd channel id {init.channel_id}, expected 0.."
                               f"{self.channels - 1} (--channels {self.channels})")
            return
        held = sum(len(g) for g in self._groups.values())
        if held >= 2 * self.channels + 16:
            self._reject(sock, f"more than {held} multifd channels waiting for their group")
            return
        group = self._groups.setdefault(init.uuid, {})
        if init.channel_id in group:
            self._reject(sock, f"multifd channel id {init.channel_id} with uuid "
                               f"{format_uuid(init.uuid)} already connected")
            return
        group[init.channel_id] = sock
        if len(group) < self.channels:
            return
        receiver = self.receiver
        assert receiver is not None
        self.source_uuid = receiver.uuid = init.uuid
        beyond = self._beyond.get(init.uuid)
        if beyond is not None:
            validate_init(beyond, uuid=init.uuid, channels=self.channels)
        for other, socks in self._groups.items():
            if other != init.uuid:
                for s in socks.values():
                    self._reject(s, f"multifd channel with uuid {format_uuid(other)}; the "
                                    f"source's channels have {format_uuid(init.uuid)}")
        self._groups.clear()
        for cid, s in sorted(group.items()):
            receiver.accept_channel(s, InitPacket(uuid=init.uuid, channel_id=cid))

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
        output: Any = FileOutput(self.out_dir) if self.mapped_ram is None else \
            _mapped_ram_output(self.mapped_ram)
        output.start()
        self.receiver = Receiver(self.method, channels=self.channels, page_size=self.page_size,
                                 uuid=self.expected_uuid or bytes(16), timeout=self.timeout)
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
            self._writeback.stop()
            self._stop.set()
            if self._gate is not None:
                self._gate.wake()  # the acceptor's poll returns now, not at its next timeout
            if self._acceptor is not None:
                self._acceptor.join(2)
            if self.listener is not None:
                self.listener.close()
            if self.receiver is not None:
                if not ok:
                    self.receiver.fail(CaptureError("capture aborted"))
                self.receiver.close()
            for group in self._groups.values():
                for s in group.values():
                    s.close()
            if self._main is not None:
                self._main.close()
            if ok:
                output.close()
            else:
                output.discard()

    def _wait_main(self) -> tuple[socket.socket, bytes]:
        """``wait_first`` for the source's first connection (a multifd channel of a uuid
        group, or the main one), then ``timeout`` from it for the main one."""
        deadline, limit = time.monotonic() + self.wait_first, self.wait_first
        while True:
            self._check()
            try:
                return self._main_q.get(timeout=_POLL)
            except queue.Empty:
                if any(list(self._groups.values())) and limit == self.wait_first:
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
                most = max((len(g) for g in list(self._groups.values())), default=0)
                refused = (f"; {len(self.rejected)} connection(s) refused, the last: "
                           f"{self.rejected[-1]}" if self.rejected else "")
                raise CaptureError(
                    f"the source opened {most} multifd channel(s), expected "
                    f"{self.channels} (--channels must equal the source's multifd-channels)"
                    f"{refused}")
            time.sleep(0.01)

    def _session(self, output: FileOutput) -> dict[str, Any]:
        assert self.receiver is not None
        receiver = self.receiver
        main, head = self._wait_main()
        t0 = time.perf_counter()
        self._phases.enter("transferring")
        main.settimeout(_POLL)
        reader = qs.MainStreamReader(page_size=self.page_size)
        tail = qs.TailTracker()
        tail_fd = output.create_aside(TAIL_FILE)
        blocks: dict[str, RamBlock] = {}
        per_section: bool | None = None
        return_path = False
        shut_sent = False
        switchover = False
        last_data = time.monotonic()
        buf = bytearray(1 << 20)
        chunk: memoryview | None = memoryview(head)  # the opening bytes the gate read
        try:
            while True:
                self._check()
                if chunk is None:
                    try:
                        n = main.recv_into(buf)
                    except TimeoutError:
                        if time.monotonic() - last_data > self.timeout:
                            raise TransportError(f"main stream: no data for {self.timeout} s"
                                                 ) from None
                        continue
                    except OSError as exc:
                        self._check()
                        raise TransportError(f"main stream: {exc}") from None
                    last_data = time.monotonic()
                    if n == 0:
                        break
                    chunk = memoryview(buf)[:n]
                self.stats.main_bytes += len(chunk)
                reader.feed(chunk)
                chunk = None
                receiver.touch()
                for ev in reader.events():
                    if isinstance(ev, qs.TailData):
                        _write_all(tail_fd, ev.data, TAIL_FILE + PARTIAL)
                        tail.feed(ev.data)
                        if return_path and not shut_sent and self._tail_done(tail,
                                                                              tail_fd):
                            main.sendall(qs.shut(0))
                            shut_sent = True
                    elif isinstance(ev, qs.RamPage):
                        _apply_main_page(blocks, ev, self.page_size, self.stats)
                        receiver.mark_received(ev.block,
                                               np.array([ev.offset // self.page_size]))
                    elif isinstance(ev, qs.Flush):
                        self.stats.flushes += 1
                        receiver.sync_round()
                    elif isinstance(ev, qs.Eos):
                        if per_section is None:
                            per_section = reader.flushes == 0
                        if per_section:
                            receiver.sync_round()
                    elif isinstance(ev, qs.SectionHeader):
                        self.stats.ram_sections += 1
                    elif isinstance(ev, qs.MemSize):
                        self._wait_channels()
                        if self.mapped_ram is not None:  # lay the file out first
                            output.begin(reader.prologue, reader.ram_section_id, ev.blocks,
                                         self.page_size)
                        self._allocate(output, ev, blocks)
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
                device_bytes, vmdesc_at = tail.split()
            except qs.StreamError as exc:
                raise CaptureError(f"the source's main stream ended early or badly: {exc}"
                                   ) from None
            # QEMU always sends the vmdesc in precopy; without it a cut inside the device
            # state that happens to end on a 00 byte would pass for the EOF marker.
            if vmdesc_at is None:
                raise CaptureError("the source's main stream ended without the vmdesc after the "
                                   "device state (closed early?)")
            vmdesc = _pread_all(tail_fd, tail.length - vmdesc_at, vmdesc_at)
            try:
                qs.parse_vmdesc(vmdesc)
            except qs.StreamError as exc:
                raise CaptureError(str(exc)) from None
            try:
                os.fsync(tail_fd)
            except OSError as exc:
                raise io_error(exc, str(self.out_dir / (TAIL_FILE + PARTIAL))) from None
        finally:
            os.close(tail_fd)
        self._phases.enter("finishing")
        # A 9.0-9.2 source leaves one unpaired SYNC per channel: release it.
        receiver.release_all()
        receiver.finish()
        self._writeback.stop()
        self.stats.seconds = time.perf_counter() - t0
        self.stats.sync_rounds = receiver.rounds
        self.stats.channels = [dict(vars(s)) for s in receiver.stats]
        if return_path and not shut_sent:
            raise CaptureError("the return path was opened but the vmdesc never completed")
        return self._commit(output, reader, blocks, tail, device_bytes, vmdesc,
                            per_section=bool(per_section), return_path=return_path,
                            switchover=switchover)

    def _allocate(self, output: FileOutput, ev: qs.MemSize, blocks: dict[str, RamBlock]) -> None:
        """The output files of the MEM_SIZE list, after checking space and descriptors."""
        for info in ev.blocks:
            if info.length > 1 << 40:
                raise CaptureError(f"ramblock {printable(info.name)}: length {info.length} "
                                   "is beyond 1 TiB")
        ensure_open_files(len(ev.blocks) + self.channels, "the capture")
        output.reserve(sum(info.length for info in ev.blocks))
        for info in ev.blocks:
            blocks[info.name] = output.allocate(info.name, info.length, self.page_size)
        # The disk writes what has landed while the source still sends the rest.
        self._writeback = Writeback([b.fd for b in blocks.values() if b.file_backed]).start()

    @staticmethod
    def _tail_done(tail: qs.TailTracker, fd: int) -> bool:
        """Whether the tail ends with a whole vmdesc that parses (the return path then
        owes the source its SHUT)."""
        if not tail.complete():
            return False
        _, at = tail.split()
        assert at is not None
        try:
            qs.parse_vmdesc(_pread_all(fd, tail.length - at, at))
        except qs.StreamError:
            return False
        return True

    # ------------------------------------------------------------------ output

    def _commit(self, output: FileOutput, reader: qs.MainStreamReader,
                blocks: dict[str, RamBlock], tail: qs.TailTracker, device_bytes: int,
                vmdesc: bytes, *, per_section: bool, return_path: bool,
                switchover: bool) -> dict[str, Any]:
        pro = reader.prologue
        assert pro is not None and reader.tail_offset is not None
        output.write_aside(PREFIX_FILE, pro.raw)
        output.write_aside(VMDESC_FILE, vmdesc)
        self._phases.enter("hashing+durable")
        digests = output.flush_while(lambda: {name: b.digest() for name, b in blocks.items()})
        self._phases.enter("committing")
        self.stats.phases = dict(self._phases.seconds)
        stats = self.stats.as_dict()
        zpd = "legacy" if self.stats.main_zero_pages else (
            "multifd" if stats["zero_pages"] else "none or no zero pages")
        extra = manifest_fields(
            pro, pro.raw, capabilities=pro.capabilities, page_size=self.page_size,
            vmdesc_length=len(vmdesc),
            tail={"offset": reader.tail_offset, "length": tail.length, "sha256": tail.sha256,
                  "device_bytes": device_bytes},
            uuid=format_uuid(self.source_uuid or bytes(16)), method=self.method_name,
            channels=self.channels, sync_mode="per-section" if per_section else "per-round",
            return_path=return_path, switchover_start=switchover, zero_page_detection=zpd,
            ram_section_id=reader.ram_section_id, commands=[c.name for c in reader.commands],
            statistics=stats)
        where = output.commit(digests, extra, flush=False, algorithm=DEFAULT_DIGEST)
        self._phases.finish()
        if self.mapped_ram is not None:
            return {"file": where, "blocks": [{"name": n, "length": b.used_length,
                                               DEFAULT_DIGEST: digests[n]}
                                              for n, b in blocks.items()],
                    **extra}
        return json.loads((self.out_dir / "manifest.json").read_text())


def manifest_fields(pro: qs.Prologue, prefix: bytes, *, capabilities: tuple[str, ...],
                    page_size: int, vmdesc_length: int, tail: dict[str, Any],
                    **fields: Any) -> dict[str, Any]:
    """A capture manifest's entries besides ``blocks``: what the prologue, ``prefix.bin``,
    ``tail.bin`` and ``vmdesc.json`` say, plus the session's own ``fields`` (uuid, method,
    channels, sync_mode, return_path, switchover_start, ...)."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "machine": pro.machine,
        "configuration": {"capabilities": list(capabilities),
                          "uuid": format_uuid(pro.uuid) if pro.uuid else None,
                          "target_page_bits": pro.target_page_bits},
        "page_size": page_size,
        **fields,
        "prefix": {"file": PREFIX_FILE, "length": len(prefix),
                   "sha256": hashlib.sha256(prefix).hexdigest()},
        "tail": {"file": TAIL_FILE, **tail},
        "vmdesc": {"file": VMDESC_FILE, "length": vmdesc_length},
    }


def _mapped_ram_output(path: str | os.PathLike[str]) -> Any:
    from multifd_core.qemu.mappedfile import MappedRamOutput

    return MappedRamOutput(path)


def _opening_len(head: bytes) -> int:
    """Bytes a capture connection must send before it is judged: ``QEVM`` is enough for the
    main channel; a multifd channel sends its whole init packet."""
    return len(QEVM) if len(head) < len(QEVM) or head[:4] == QEVM else INIT_LEN


def _write_all(fd: int, data: bytes, what: str) -> None:
    view = memoryview(data)
    try:
        while len(view):
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise io_error(exc, what) from None


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


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
