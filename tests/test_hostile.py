"""Hostile and broken input over real loopback TCP, against the Receiver and the native
session: each refused with the field, the received and the expected value, nothing written
outside a block, nothing allocated from an unchecked peer value, no hang."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from netkit import (
    PS,
    UUID,
    RawSender,
    Served,
    assert_no_engine_threads,
    frame,
    hello_frame,
    raw_packet,
    read_msg,
    require_method,
)

from multifd_core import wire
from multifd_core.engine.harness import MethodHarness
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.receiver import Receiver
from multifd_core.errors import MultiFDError, TransportError, WireError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import default_registry
from multifd_core.session import send as session_mod
from multifd_core.session import send_session
from multifd_core.session.transport import Address, accept, bound_address, connect, listen
from multifd_core.testing import wait_until
from multifd_core.wire.protocol import Msg

N_PAGES = 16


def assert_names(err: WireError, field: str) -> None:
    """The message names the field with the received and the expected value."""
    assert err.field == field, str(err)
    assert err.received is not None and err.expected is not None, str(err)
    assert f"[field {field}: received {err.received}, expected {err.expected}]" in str(err)


@contextmanager
def tcp_receiver(method: str = "none", channels: int = 1, **kw) -> Iterator[
        tuple[Receiver, RamBlock, callable]]:
    """A Receiver fed over real loopback TCP; ``chan(i)`` connects channel ``i``."""
    block = RamBlock.zeros("ram", N_PAGES * PS)
    rx = Receiver(default_registry().create(method), channels=channels, uuid=UUID,
                  timeout=kw.pop("timeout", 5), **kw)
    rx.set_blocks([block])
    lst = listen(Address("tcp", host="127.0.0.1", port=0))
    addr = bound_address(lst, Address("tcp", host="127.0.0.1"))
    clients: list[socket.socket] = []

    def chan(cid: int, init: bytes | None = None) -> socket.socket:
        c = connect(addr, timeout=5)
        clients.append(c)
        s = accept(lst, 5)
        c.sendall(wire.encode_init(UUID, cid) if init is None else init)
        try:
            rx.accept_channel(s)
        except BaseException:
            s.close()
            raise
        return c

    try:
        yield rx, block, chan
    finally:
        rx.fail(MultiFDError("test over"))
        rx.close()
        lst.close()
        for c in clients:
            c.close()


# --------------------------------------------------------------------------- init packets


def _init(magic: int = wire.MAGIC, version: int = wire.VERSION, uuid: bytes = UUID,
          cid: int = 0) -> bytes:
    return wire.INIT.pack(magic, version, uuid, cid)


@pytest.mark.parametrize(
    ("init", "field", "text"),
    [
        (_init(magic=0xDEADBEEF), "magic", "received packet magic deadbeef expected 11223344"),
        (_init(version=2), "version", "received packet version 2 expected 1"),
        (_init(uuid=bytes(16)), "uuid", "expected uuid '00010203-0405"),
        (_init(cid=2), "id", "received channel id 2 is greater than number of channels 2"),
        (_init(cid=255), "id", "channel id 255"),
    ],
)
def test_init_packet_refused(init: bytes, field: str, text: str) -> None:
    with tcp_receiver(channels=2) as (rx, _, chan):
        with pytest.raises(WireError, match=text) as err:
            chan(0, init)
        assert_names(err.value, field)
        assert rx.connected == 0


def test_duplicate_and_surplus_channels_refused() -> None:
    with tcp_receiver(channels=2) as (rx, _, chan):
        chan(0)
        with pytest.raises(WireError, match="received id '0' already setup") as err:
            chan(0)
        assert_names(err.value, "id")
        chan(1)
        for cid in (0, 1, 2):  # a third connection: every id is taken or out of range
            with pytest.raises(WireError) as err:
                chan(cid)
            assert err.value.field == "id"
        assert rx.connected == 2


def test_short_init_packet_times_out() -> None:
    with tcp_receiver(timeout=0.5) as (_, _, chan):
        t = time.monotonic()
        with pytest.raises(TransportError, match="init packet"):
            chan(0, b"\x11\x22\x33")
        assert time.monotonic() - t < 3


# --------------------------------------------------------------------------- RAM packets

BAD_PACKETS = {
    "pages_alloc": (raw_packet(pages_alloc=129), "received packet with 129 pages"),
    "normal_pages": (raw_packet(pages_alloc=4, normal=5, size=5 * PS),
                     "5 non-zero pages, which exceeds maximum expected pages 4"),
    "zero_pages": (raw_packet(pages_alloc=4, normal=2, zero=3, size=2 * PS),
                   "3 zero pages, expected maximum 2"),
    "offset_end": (raw_packet(normal=1, size=PS, offsets=[N_PAGES * PS]), "offset too long"),
    "offset_far": (raw_packet(zero=1, offsets=[2**64 - PS]), "offset too long"),
    "offset_unaligned": (raw_packet(normal=1, size=PS, offsets=[PS + 1]), "not page aligned"),
    "ramblock": (raw_packet(normal=1, size=PS, name=b"nosuch", offsets=[PS]),
                 "unknown ram block nosuch"),
    "ramblock_no_nul": (raw_packet(normal=1, size=PS, name=b"r" * 256, offsets=[PS]),
                        "unknown ram block rrrr"),
    "flags_method": (raw_packet(flags=0x02, normal=1, size=PS, offsets=[PS]),
                     "flags received 2 flags expected 0"),
    "flags_unknown": (raw_packet(flags=0x80, normal=1, size=PS, offsets=[PS]),
                      "unknown flags 80"),
    "next_packet_size": (raw_packet(normal=1, size=2 * PS, offsets=[PS]),
                         "unexpectedly large packet"),
    "next_packet_size_huge": (raw_packet(normal=1, size=2**32 - 1, offsets=[PS]),
                              "unexpectedly large packet"),
    "payload_without_pages": (raw_packet(size=100), "without pages carries a payload"),
    "zero_page_payload": (raw_packet(zero=1, size=100, offsets=[PS]),
                          "without normal pages carries a payload"),
    "magic": (raw_packet(magic=0x11223345), "received packet magic 11223345"),
    "version": (raw_packet(version=7), "received packet version 7"),
    "header_eof": (raw_packet()[:7], "unexpected EOF in packet header"),
    "packet_eof": (raw_packet()[:700], "unexpected EOF after packet header"),
    "payload_eof": (raw_packet(normal=1, size=PS, offsets=[PS]) + b"x" * 100,
                    "unexpected EOF in packet payload"),
    "device_state_unexpected": (wire.encode_device_state("dev", 0, 10) + bytes(10),
                                "unexpected device state packet"),
    "device_state_huge": (wire.encode_device_state("dev", 0, 2**32 - 1),
                          "device state packet too large"),
    "device_state_idstr": (wire.DEVICE_STATE.pack(wire.MAGIC, 1, 0x40, b"d" * 256, 0, 10),
                           "unterminated multifd device state idstr"),
}
FIELD_OF = {"offset_end": "offset", "offset_far": "offset", "offset_unaligned": "offset",
            "ramblock_no_nul": "ramblock", "flags_method": "flags", "flags_unknown": "flags",
            "next_packet_size_huge": "next_packet_size",
            "payload_without_pages": "next_packet_size", "zero_page_payload":
            "next_packet_size", "header_eof": "header", "packet_eof": "packet",
            "payload_eof": "payload", "device_state_unexpected": "flags",
            "device_state_huge": "next_packet_size", "device_state_idstr": "idstr"}


@pytest.mark.parametrize("case", sorted(BAD_PACKETS))
def test_bad_ram_packet_refused(case: str) -> None:
    data, text = BAD_PACKETS[case]
    tracemalloc.start()
    try:
        with tcp_receiver() as (rx, block, chan):
            c = chan(0)
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            with pytest.raises(WireError, match=text) as err:
                rx.finish(timeout=5)
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_names(err.value, FIELD_OF.get(case, case))
    assert err.value.channel == 0 and str(err.value).startswith("channel 0: ")
    # Nothing written anywhere but (for a payload cut short) the packet's own page.
    assert not np.delete(block.pages, 1, axis=0).any()
    # Nothing sized from the peer's counts: well under one 4 GiB (or even 1 MiB) buffer.
    assert peak < 4 << 20, peak


def test_valid_packets_still_land_after_the_checks() -> None:
    """The control case: the same channel set-up accepts a well-formed packet."""
    with tcp_receiver() as (rx, block, chan):
        c = chan(0)
        c.sendall(raw_packet(normal=1, size=PS, offsets=[3 * PS]) + b"\x5a" * PS)
        c.close()
        rx.finish(timeout=5)
    assert block.pages[3].tobytes() == b"\x5a" * PS and not np.delete(block.pages, 3, 0).any()


def test_page_named_twice_stays_inside_its_page() -> None:
    """The engine does not refuse a page named twice in one packet (harmless, off the hot
    path): the later copy wins and nothing else is touched."""
    with tcp_receiver() as (rx, block, chan):
        c = chan(0)
        c.sendall(raw_packet(normal=2, size=2 * PS, offsets=[PS, PS]) + b"\x01" * PS
                  + b"\x02" * PS)
        c.close()
        rx.finish(timeout=5)
    assert block.pages[1].tobytes() == b"\x02" * PS and not np.delete(block.pages, 1, 0).any()


# --------------------------------------------------------------------------- compressed payloads


def _payload(method: str, pages: np.ndarray) -> bytes:
    m = default_registry().create(method, MethodOptions(page_size=PS))
    with MethodHarness(m) as h:
        return h.encode(pages)


@pytest.mark.parametrize("method", ["zlib", "zstd"])
@pytest.mark.parametrize("kind", ["bomb", "short", "garbage"])
def test_compressed_payload_refused(method: str, kind: str) -> None:
    """A payload that inflates past its packet (a bomb: 64 pages' worth claimed as one),
    short of it (one page claimed as two), or is not a stream at all."""
    require_method(method)
    filler = np.full((64, PS), 0x41, dtype=np.uint8)
    if kind == "bomb":
        payload, offsets = _payload(method, filler), [PS]
    elif kind == "short":
        payload, offsets = _payload(method, filler[:1]), [PS, 2 * PS]
    else:
        payload, offsets = bytes(range(256)) * 4, [PS]
    code = default_registry().get(method).code
    pkt = raw_packet(flags=code, normal=len(offsets), size=len(payload), offsets=offsets)
    with tcp_receiver(method) as (rx, block, chan):
        c = chan(0)
        c.sendall(pkt + payload)
        c.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError) as err:
            rx.finish(timeout=5)
    assert err.value.field is not None and err.value.expected is not None, str(err.value)
    if kind != "garbage":
        assert err.value.field == "decoded_size", str(err.value)
        assert str(PS * len(offsets)) in str(err.value)
    assert not block.array.any()  # decoded output is checked before any page is written


# --------------------------------------------------------------------------- session handshake


@pytest.mark.parametrize(
    ("data", "error", "field"),
    [
        (frame(1, b"{}", version=9), WireError, "version"),
        (frame(1, b"{}", magic=b"MFDS", length=(1 << 20) + 1), WireError, "length"),
        (frame(1, b"{}", length=2**32 - 1), WireError, "length"),
        (frame(5, b'{"digests":{}}'), WireError, "type"),
        (frame(99, b"{}"), WireError, "type"),
        (frame(1, b"not json"), WireError, "body"),
        (frame(1, b"[" * 200_000 + b"]" * 200_000), WireError, "body"),
        (frame(1, b"[1, 2]"), WireError, "body"),
        (hello_frame(channels=9), WireError, "channels"),
        (hello_frame(blocks=[("ram", 3 << 40)]), WireError, "blocks"),
        (hello_frame(page_size=3000), WireError, "page_size"),
        (hello_frame(uuid=b"x" * 16, blocks=[("\ud800", PS)]), WireError, "blocks.name"),
        (hello_frame(offers="none"), WireError, "offers"),
    ],
)
def test_bad_hello_refused(data: bytes, error: type, field: str) -> None:
    served = Served({"max_channels": 8})
    with served.connect() as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        kind, body = read_msg(s)
    err = served.wait()
    assert isinstance(err, error), repr(err)
    assert_names(err, field)
    assert kind is Msg.REFUSE and f"field {field}" in body["reason"]
    assert served.session.blocks == []  # nothing allocated
    assert_no_engine_threads()


@pytest.mark.parametrize("cut", [6, 12 + 10])
def test_truncated_hello(cut: int) -> None:
    served = Served()
    with served.connect() as s:
        s.sendall(hello_frame()[:cut])
        s.shutdown(socket.SHUT_WR)
        t = time.monotonic()
        err = served.wait()
    assert time.monotonic() - t < 3
    assert isinstance(err, TransportError)
    assert "main channel closed by the peer" in str(err)
    assert f"after {cut if cut < 12 else cut - 12} of" in str(err)


def test_silent_and_stray_connections_do_not_block_the_sender() -> None:
    """Before the session: a silent connection, a garbage one and a half-open one are each
    refused on their own deadline while the real sender gets through at once."""
    served = Served({"handshake_timeout": 1.0})
    strays = [served.connect() for _ in range(3)]
    strays[1].sendall(b"GET / HTTP/1.0\r\n\r\n")
    strays[2].sendall(b"MF")
    block = RamBlock("ram", np.random.default_rng(1).integers(0, 255, 64 * PS, np.uint8))
    t = time.monotonic()
    stats = send_session([block], served.addr, method="none", channels=2, timeout=5)
    assert time.monotonic() - t < 2.5
    assert served.wait() is None and stats.normal_pages == 64
    assert any("first bytes 47455420" in r for r in served.session.rejected)
    for s in strays:
        s.close()
    assert_no_engine_threads()


def test_stray_channels_mid_session_are_refused_and_the_session_completes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections arriving while the channels connect: wrong uuid, id out of range, wrong
    magic, and a silent one. All refused and logged; the session completes. (A stray with
    the right uuid and a free id would take that channel's place: the uuid is the session's
    secret, so untrusted networks need TLS, which keeps it secret.)"""
    fixed = uuidlib.UUID(bytes=UUID)
    monkeypatch.setattr(session_mod.uuidlib, "uuid4", lambda: fixed)
    strays: list[socket.socket] = []
    calls = []
    real_connect = session_mod.connect

    def connect_with_strays(addr, **kw):  # noqa: ANN001, ANN003
        calls.append(addr)
        if len(calls) == 3:  # after the main channel and channel 0, before channel 1
            for init in (wire.encode_init(bytes(16), 1), wire.encode_init(UUID, 7),
                         b"\xde\xad\xbe\xef" + bytes(60), b""):
                s = socket.create_connection((addr.host, addr.port))
                s.sendall(init)
                strays.append(s)
            # The acceptor refuses the three that sent something before channel 1 connects.
            wait_until(lambda: len(served.session.rejected) >= 3, "the strays refused")
        return real_connect(addr, **kw)

    monkeypatch.setattr(session_mod, "connect", connect_with_strays)
    served = Served({"handshake_timeout": 1.0})
    block = RamBlock("ram", np.random.default_rng(2).integers(0, 255, 256 * PS, np.uint8))
    stats = send_session([block], served.addr, method="none", channels=2, timeout=5)
    assert served.wait() is None
    assert stats.normal_pages == 256
    rejected = " | ".join(served.session.rejected)
    for needle in ("expected uuid '00010203", "received channel id 7 is greater",
                   "not a multifd channel"):
        assert needle in rejected, rejected
    assert (served.session.blocks[0].array == block.array).all()
    for s in strays:
        s.close()
    assert_no_engine_threads()


def _finish_raw(sender: RawSender, served: Served) -> None:
    """Page 0 = 0x01 on channel 0, a SYNC on every channel, ROUND, EOF, DONE: must verify."""
    sender.channels[0].sendall(raw_packet(normal=1, size=PS, offsets=[0]) + b"\x01" * PS)
    for i, ch in enumerate(sender.channels):
        ch.sendall(bytes(wire.encode_sync_packet(10 + i, PS)))
    sender.main.sendall(frame(Msg.ROUND, b'{"round":0}'))
    for ch in sender.channels:
        ch.shutdown(socket.SHUT_WR)
    digest = RamBlock("ram", bytearray(b"\x01" * PS + bytes(3 * PS))).sha256()
    sender.main.sendall(frame(Msg.DONE, b'{"digests":{"ram":"%s"}}' % digest.encode()))
    kind, body = read_msg(sender.main)
    assert kind is Msg.RESULT and body == {"ok": True}, body
    assert served.wait() is None
    sender.close()


def test_duplicate_channel_id_mid_session_is_refused() -> None:
    served = Served()
    sender = RawSender(served, channels=2, blocks=[("ram", 4 * PS)], connect=1)
    receiver = wait_until(lambda: served.session._receiver, "the session's receiver")
    wait_until(lambda: receiver.connected == 1, "channel 0 registered")
    dup = served.connect()
    dup.sendall(wire.encode_init(UUID, 0))
    wait_until(lambda: served.session.rejected, "the duplicate refused")
    sender.connect_channel(served, 1)
    _finish_raw(sender, served)
    assert any("received id '0' already setup" in r for r in served.session.rejected)
    dup.close()


def test_more_connections_than_channels_after_setup_do_not_disturb() -> None:
    served = Served()
    sender = RawSender(served, channels=1, blocks=[("ram", 4 * PS)])
    extra = [served.connect() for _ in range(3)]
    for e in extra:
        e.sendall(wire.encode_init(UUID, 0))
    _finish_raw(sender, served)
    for e in extra:
        e.close()


def test_receive_session_caps_ram_and_channels() -> None:
    served = Served({"max_ram": 1 << 20, "max_channels": 4})
    with served.connect() as s:
        s.sendall(hello_frame(blocks=[("a", 1 << 19), ("b", (1 << 19) + PS)]))
        kind, body = read_msg(s)
    err = served.wait()
    assert kind is Msg.REFUSE and "ramblocks too large" in body["reason"]
    assert isinstance(err, WireError) and err.field == "blocks"


def test_allocation_failure_is_refused_cleanly() -> None:
    def allocate(name: str, length: int, ps: int) -> RamBlock:
        raise MemoryError

    served = Served(allocate=allocate)
    block = RamBlock.zeros("ram", 64 * PS)
    with pytest.raises(MultiFDError, match="receiver refused the session: cannot allocate"):
        send_session([block], served.addr, method="none", timeout=5)
    assert "cannot allocate ramblock ram" in str(served.wait())


# --------------------------------------------------------------------------- listening


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3", "example.com"])
def test_recv_listens_on_loopback_unless_allowed(host: str, tmp_path,  # noqa: ANN001
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from multifd_core.cli import main

    rc = main(["recv", "--listen", f"tcp:{host}:0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "recv listens on loopback unless --allow-remote" in capsys.readouterr().err


def test_loopback_addresses_are_recognised() -> None:
    from multifd_core.session.transport import is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_qemu_capture_listens_on_loopback_unless_allowed(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    from multifd_core.cli import main

    rc = main(["qemu", "capture", "--listen", "tcp:0.0.0.0:0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--allow-remote" in capsys.readouterr().err


def test_sender_refuses_a_hostile_accept() -> None:
    """A receiver that answers ACCEPT with a method the sender did not offer, or garbage."""
    for accept_body in (b'{"method":["none"]}', b'{"method":"nosuch"}', b'{}'):
        lst = listen(Address("tcp", host="127.0.0.1", port=0))
        addr = bound_address(lst, Address("tcp", host="127.0.0.1"))

        def serve(body: bytes = accept_body, lst: socket.socket = lst) -> None:
            lst.settimeout(5)
            m, _ = lst.accept()
            read_msg(m)
            m.sendall(frame(Msg.ACCEPT, body))
            time.sleep(0.5)
            m.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(MultiFDError, match="which this sender did not offer|bad ACCEPT "
                                               r"\[field method"):
            send_session([RamBlock.zeros("ram", PS)], addr, timeout=5)
        t.join(5)
        lst.close()


@pytest.mark.parametrize(
    ("send_args", "needle"),
    [
        (["--channels", "3"], "channel count out of range [field channels: received 3, "
                              "expected 1..2]"),
        (["--channels", "2"], "ramblocks too large [field blocks: received 2097152, "
                              "expected <= 1048576 bytes in all]"),
    ],
)
def test_cli_recv_limits(tmp_path, send_args: list[str], needle: str) -> None:  # noqa: ANN001
    import subprocess
    import sys

    image = tmp_path / "ram.img"
    image.write_bytes(b"\x01" * (2 << 20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"tcp:127.0.0.1:{s.getsockname()[1]}"
    cli = [sys.executable, "-m", "multifd_core.cli"]
    recv = subprocess.Popen([*cli, "recv", "--listen", addr, "--out", str(tmp_path / "o"),
                             "--max-channels", "2", "--max-ram", "1M", "--timeout", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    send = subprocess.run([*cli, "send", str(image), addr, *send_args], capture_output=True,
                          text=True, timeout=60)
    _, r_err = recv.communicate(timeout=30)
    assert recv.returncode == 1 and needle in r_err, r_err
    assert send.returncode == 1 and "receiver refused the session" in send.stderr
    assert needle in send.stderr, send.stderr
    assert list((tmp_path / "o").iterdir()) == []


def test_parse_size() -> None:
    from multifd_core.cli import parse_size

    assert parse_size("1T") == 1 << 40 and parse_size("512M") == 512 << 20
    assert parse_size("4096") == 4096 and parse_size("1.5GiB") == 3 << 29
    for bad in ("x", "-1G", "0"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
