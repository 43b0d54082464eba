"""Capture driven by real QEMU 10.0.2 migrations recorded byte for byte (main stream and both
channels of a 64 MiB paused pc guest with 40 random pages), replayed over loopback sockets:
machine type 10.0 (per-round sync, multifd zero pages) and 8.0 (per-section sync: a SYNC per
channel at every RAM EOS; zero pages on the main stream). Runs without QEMU."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from netkit import assert_untouched, plant_links
from qemu_support import DATA, read_vector, require_method

from multifd_core import wire
from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.digest import digest_of
from multifd_core.errors import MultiFDError
from multifd_core.qemu import stream as qs
from multifd_core.qemu.capture import QemuCapture
from multifd_core.testing import wait_until


def load(name: str) -> tuple[dict, bytes, list[bytes]]:
    expected = json.loads((DATA / f"{name}.json").read_text())
    return (expected, read_vector(f"{name}.main.gz"),
            [read_vector(f"{name}.ch{i}.gz") for i in range(expected["channels"])])


NAME = "pc-10.0-sparse"
PS = 4096
EXPECTED, MAIN, CHANNELS = load(NAME)


def play(port: int, main: bytes, channels: list[bytes], *, main_last: bool = False,
         delay: float = 0.0) -> list[BaseException]:
    """Connect like a QEMU source and write every stream concurrently."""
    errors: list[BaseException] = []

    def write(sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(4096):
                pass
        except OSError as exc:
            errors.append(exc)
        finally:
            sock.close()

    order = [(main, "main")] + [(c, "ch") for c in channels]
    if main_last:
        order = order[1:] + order[:1]
    threads = []
    for data, _ in order:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        t = threading.Thread(target=write, args=(sock, data), daemon=True)
        threads.append(t)
        if delay:
            time.sleep(delay)
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def capture(tmp_path: Path, main: bytes = MAIN, streams: list[bytes] | None = None, *,
            main_last: bool = False, strangers: list[bytes | None] = (),
            before_play: Callable[[QemuCapture], bool] | None = None,
            cap_out: list[QemuCapture] | None = None, **kw) -> dict:
    """Capture the recorded migration. ``strangers`` connect first (None: a connection that
    sends nothing) and stay open until the capture ended; the source starts once
    ``before_play(capture)`` is true."""
    kw.setdefault("channels", len(CHANNELS if streams is None else streams))
    kw.setdefault("timeout", 10.0)
    cap = QemuCapture(tmp_path / "out", **kw)
    if cap_out is not None:
        cap_out.append(cap)
    _, port = cap.listen("127.0.0.1", 0)
    held = []
    for data in strangers:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if data:
            s.sendall(data)
        held.append(s)
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = cap.run()
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while before_play is not None and not before_play(cap):
        assert time.monotonic() < deadline, "before_play never became true"
        time.sleep(0.02)
    play(port, main, CHANNELS if streams is None else streams, main_last=main_last)
    t.join(30)
    for s in held:
        s.close()
    assert not t.is_alive(), "capture hung"
    if "error" in result:
        assert not (tmp_path / "out" / "manifest.json").exists()
        raise result["error"]
    return result["manifest"]


def mem_is_recorded(tmp_path: Path, manifest: dict) -> bool:
    """The captured mem block is the recorded guest's (sha256 of the file) and the manifest's
    digest is the file's."""
    mem = manifest["blocks"][0]
    data = (tmp_path / "out" / mem["file"]).read_bytes()
    return (hashlib.sha256(data).hexdigest() == EXPECTED["mem_sha256"]
            and mem[DEFAULT_DIGEST] == digest_of(data))



@pytest.mark.parametrize(("name", "machine", "sync_mode"), [
    (NAME, "pc-i440fx-10.0", "per-round"), ("pc-8.0-sparse", "pc-i440fx-8.0", "per-section")])
@pytest.mark.parametrize("main_last", [False, True])

def test_recorded_migration_is_rebuilt(tmp_path: Path, main_last: bool, name: str,
                                       machine: str, sync_mode: str) -> None:
    expected, main, channels = load(name)
    m = capture(tmp_path, main, channels, main_last=main_last)
    out = tmp_path / "out"
    assert m["machine"] == machine and m["sync_mode"] == sync_mode
    assert [b["name"] for b in m["blocks"]] == ["mem", "/rom@etc/acpi/tables", "pc.bios",
                                                "pc.rom", "/rom@etc/table-loader",
                                                "/rom@etc/acpi/rsdp"]
    mem = m["blocks"][0]
    data = (out / mem["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected["mem_sha256"]
    assert mem[DEFAULT_DIGEST] == digest_of(data)
    assert (out / "prefix.bin").read_bytes() == main[:13 + len(machine)]
    tail = (out / "tail.bin").read_bytes()
    assert tail == main[m["tail"]["offset"]:]
    assert json.loads((out / "vmdesc.json").read_bytes())["page_size"] == 4096
    assert m["switchover_start"] is (sync_mode == "per-round") and m["return_path"] is False
    st = m["statistics"]
    flushes, ends = sync_points(main)
    assert st["sync_rounds"] == (flushes if sync_mode == "per-round" else ends) > 0
    assert all(c["sync_packets"] == st["sync_rounds"] for c in st["channels"])
    assert st["normal_pages"] + st["zero_pages"] == 0x4082000 // 4096


def test_one_trailing_sync_per_channel_is_accepted(tmp_path: Path) -> None:
    """QEMU 9.0-9.2 sources end every channel with one SYNC that no marker pairs: capture
    accepts it (the native session refuses such a SYNC)."""
    extra = [c + bytes(wire.encode_sync_packet(10_000 + i, 4096))
             for i, c in enumerate(CHANNELS)]
    m = capture(tmp_path, streams=extra)
    assert mem_is_recorded(tmp_path, m)
    st = m["statistics"]
    assert all(c["sync_packets"] == st["sync_rounds"] + 1 for c in st["channels"])


def sync_points(main: bytes) -> tuple[int, int]:
    """MULTIFD_FLUSH markers and RAM-section EOS markers in a main stream."""
    r = qs.MainStreamReader()
    r.feed(main)
    ends = sum(isinstance(ev, qs.Eos) for ev in r.events())
    return r.flushes, ends


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def second_packet(channel: bytes) -> int:
    """Offset of the second packet header (after the init and a SYNC of 1344 bytes)."""
    return 64 + 1344


def test_corrupted_packet_magic(tmp_path: Path) -> None:
    bad = corrupt(CHANNELS[1], second_packet(CHANNELS[1]), b"\xde\xad\xbe\xef")
    with pytest.raises(MultiFDError, match="received packet magic deadbeef"):
        capture(tmp_path, streams=[CHANNELS[0], bad])


def test_corrupted_offset(tmp_path: Path) -> None:
    at = second_packet(CHANNELS[0]) + 320  # first offset slot
    bad = corrupt(CHANNELS[0], at, (1 << 40).to_bytes(8, "big"))
    with pytest.raises(MultiFDError, match="offset too long"):
        capture(tmp_path, streams=[bad, CHANNELS[1]])


def test_source_closes_a_channel_early(tmp_path: Path) -> None:
    with pytest.raises(MultiFDError, match="unexpected EOF|channel"):
        capture(tmp_path, streams=[CHANNELS[0][:100_000], CHANNELS[1]])


@pytest.mark.parametrize("cut, match", [
    (200, "ended early, in a .*before the RAM END section"),
    (5000, "ended without the vmdesc|EOF marker"),
    (len(MAIN) - 20, "EOF marker"),
])
def test_source_closes_main_early(tmp_path: Path, cut: int, match: str) -> None:
    with pytest.raises(MultiFDError, match=match):
        capture(tmp_path, main=MAIN[:cut])


def test_wrong_uuid(tmp_path: Path) -> None:
    """Channels of another uuid than --uuid are strangers: refused, and the capture says so
    when the source's own channels never come."""
    with pytest.raises(MultiFDError, match="opened 0 multifd channel.*refused.*uuid "
                       "00000000-.*expected 11111111-.*--uuid"):
        capture(tmp_path, uuid=bytes.fromhex("11" * 16), channel_grace=1.0)


def test_fewer_channels_than_expected(tmp_path: Path) -> None:
    with pytest.raises(MultiFDError, match=r"opened 2 multifd channel\(s\), expected 3"):
        capture(tmp_path, channels=3, channel_grace=1.0)


def test_more_channels_than_expected(tmp_path: Path) -> None:
    with pytest.raises(MultiFDError, match="channel id 1 is greater than number of channels 1"):
        capture(tmp_path, channels=1)


def test_wrong_method(tmp_path: Path) -> None:
    require_method("zlib")
    with pytest.raises(MultiFDError, match="flags received 0 flags expected 2"):
        capture(tmp_path, method="zlib")


# --------------------------------------------------------------------------- Reliability II


def stranger_init(uuid: bytes, cid: int) -> bytes:
    return wire.encode_init(uuid, cid)


def test_strangers_do_not_break_a_capture(tmp_path: Path) -> None:
    """An idle connection, garbage, a short opening, a stranger's whole set of channels with
    another uuid (connected before the source's) and a second QEVM stream: each is refused
    and logged, and the capture of the source's migration completes."""
    other = bytes.fromhex("ab" * 16)
    caps: list[QemuCapture] = []
    def all_refused(cap: QemuCapture) -> bool:
        return len(cap.rejected) >= 4  # the idle and short ones at their deadline too

    m = capture(tmp_path, cap_out=caps, handshake_timeout=0.5, before_play=all_refused, strangers=[
        None,
        b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64,
        b"\x11\x22",
        stranger_init(other, 0),
        stranger_init(other, 5),
    ])
    assert mem_is_recorded(tmp_path, m)
    rejected = caps[0].rejected
    assert any("not a QEMU migration connection" in r for r in rejected), rejected
    assert any("uuid abababab" in r for r in rejected), rejected
    assert any("no complete" in r for r in rejected), rejected


def test_a_stray_qevm_after_the_main_channel_is_refused(tmp_path: Path) -> None:
    """A second QEVM stream is refused and logged; the first main channel's capture goes on.
    (A stranger whose QEVM comes first is the main channel, as on QEMU's own destination:
    see the README's security notes.)"""
    cap = QemuCapture(tmp_path / "out", channels=len(CHANNELS), timeout=10.0)
    _, port = cap.listen("127.0.0.1", 0)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(m=cap.run()), daemon=True)
    t.start()
    main = socket.create_connection(("127.0.0.1", port), timeout=10)
    main.sendall(MAIN[:100])
    wait_until(lambda: cap._main is not None, "the first QEVM connection taken as main")
    stray = socket.create_connection(("127.0.0.1", port), timeout=10)
    stray.sendall(MAIN[:100])
    wait_until(lambda: cap.rejected, "the stray refused")
    main.sendall(MAIN[100:])
    main.shutdown(socket.SHUT_WR)
    play(port, b"", CHANNELS)  # the channels only (an empty "main" connection is closed)
    t.join(30)
    main.close()
    stray.close()
    assert mem_is_recorded(tmp_path, result["m"])
    assert any("a second main connection" in r for r in cap.rejected), cap.rejected


def with_vmdesc(main: bytes, vmdesc: bytes) -> bytes:
    """MAIN with its vmdesc replaced (EOF 00, 06, be32 length, JSON)."""
    at = main.rfind(b"\x00\x06")
    return main[: at + 2] + len(vmdesc).to_bytes(4, "big") + vmdesc


def test_deeply_nested_vmdesc_is_one_clear_error(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MultiFDError, match="vmdesc JSON is nested too deeply"):
        capture(tmp_path, main=with_vmdesc(MAIN, deep))
    assert not any(p.name.endswith(".ram") for p in (tmp_path / "out").iterdir())


def test_a_huge_mem_size_list_is_refused_at_once(tmp_path: Path) -> None:
    """40,000 zero-length blocks: refused in the parser, before any file is created."""
    r = qs.MainStreamReader()
    r.feed(MAIN)
    pro = next(ev for ev in r.events() if isinstance(ev, qs.Prologue))
    blocks = [qs.BlockInfo(f"b{i}", 0) for i in range(40_000)] + [qs.BlockInfo("mem", PS)]
    main = pro.raw + qs.ram_start_section(1, blocks, flush=True)
    t0 = time.process_time()
    with pytest.raises(MultiFDError, match="more than 1024 ramblocks"):
        capture(tmp_path, main=main)
    assert time.process_time() - t0 < 10  # was 24 s of CPU; a bound, not a benchmark
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_the_device_tail_is_streamed_to_its_file(tmp_path: Path) -> None:
    """A 48 MiB device tail goes to tail.bin as it arrives (it peaked at 4x in memory)."""
    tail_at = qs_tail_offset(MAIN)
    blob = np.random.default_rng(5).integers(1, 255, 48 << 20, np.uint8).tobytes()
    main = MAIN[: tail_at + 1] + blob + MAIN[tail_at + 1 :]  # inside the first section
    tracemalloc.start()
    try:
        m = capture(tmp_path, main=main)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = tmp_path / "out"
    assert (out / "tail.bin").read_bytes() == main[tail_at:]
    assert m["tail"]["sha256"] == hashlib.sha256(main[tail_at:]).hexdigest()
    # Traced from the capture's start: its own allocations (the stream was built before).
    assert peak < 16 << 20, f"{peak >> 20} MiB"


def qs_tail_offset(main: bytes) -> int:
    r = qs.MainStreamReader()
    r.feed(main)
    list(r.events())
    assert r.tail_offset is not None
    return r.tail_offset


LINKED = ["000-mem.ram.partial", "000-mem.ram", "prefix.bin", "prefix.bin.partial",
          "vmdesc.json", "vmdesc.json.partial", "tail.bin.partial", "tail.bin",
          "manifest.json.partial", "manifest.json"]


@pytest.mark.parametrize("fail", [False, True])
def test_capture_never_writes_through_planted_links(tmp_path: Path, fail: bool) -> None:
    out = tmp_path / "out"
    victims = plant_links(out, LINKED, tmp_path)
    if fail:
        with pytest.raises(MultiFDError):
            capture(tmp_path, main=MAIN[:-3])
    else:
        capture(tmp_path)
    assert_untouched(victims)
    if not fail:
        for name in ("000-mem.ram", "prefix.bin", "vmdesc.json", "tail.bin", "manifest.json"):
            assert (out / name).is_file() and not (out / name).is_symlink()
    else:
        assert not (out / "manifest.json").exists()
