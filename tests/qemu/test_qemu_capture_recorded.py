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
from pathlib import Path

import pytest
from qemu_support import DATA, read_vector, require_method

from multifd_core import wire
from multifd_core.errors import MultiFDError
from multifd_core.qemu import stream as qs
from multifd_core.qemu.capture import QemuCapture


def load(name: str) -> tuple[dict, bytes, list[bytes]]:
    expected = json.loads((DATA / f"{name}.json").read_text())
    return (expected, read_vector(f"{name}.main.gz"),
            [read_vector(f"{name}.ch{i}.gz") for i in range(expected["channels"])])


NAME = "pc-10.0-sparse"
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
            main_last: bool = False, **kw) -> dict:
    kw.setdefault("channels", len(CHANNELS if streams is None else streams))
    kw.setdefault("timeout", 10.0)
    cap = QemuCapture(tmp_path / "out", **kw)
    _, port = cap.listen("127.0.0.1", 0)
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = cap.run()
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    play(port, main, CHANNELS if streams is None else streams, main_last=main_last)
    t.join(30)
    assert not t.is_alive(), "capture hung"
    if "error" in result:
        assert not (tmp_path / "out" / "manifest.json").exists()
        raise result["error"]
    return result["manifest"]


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
    assert mem["sha256"] == expected["mem_sha256"]
    assert hashlib.sha256((out / mem["file"]).read_bytes()).hexdigest() == mem["sha256"]
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
    assert m["blocks"][0]["sha256"] == EXPECTED["mem_sha256"]
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
    with pytest.raises(MultiFDError, match="received uuid '00000000-.*expected uuid '11111111"):
        capture(tmp_path, uuid=bytes.fromhex("11" * 16))


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
