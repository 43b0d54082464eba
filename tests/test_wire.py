"""The wire layer: golden bytes, round-trips and every receiver check."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from multifd_core import wire
from multifd_core.errors import WireError

PS = 4096
UUID = bytes(range(16))


def test_sizes_match_qemu() -> None:
    assert wire.INIT_LEN == 64
    assert wire.HEADER_LEN == 12
    assert wire.RAM_FIXED_LEN == 320
    assert wire.ram_packet_len(4096) == 1344
    assert wire.ram_packet_len(8192) == 320 + 8 * 64
    assert wire.DEVICE_STATE_LEN == 276
    assert wire.page_count(4096) == 128


def test_init_packet_golden() -> None:
    raw = wire.encode_init(UUID, 3)
    assert raw == bytes.fromhex("11223344" "00000001") + UUID + b"\x03" + bytes(39)
    init = wire.decode_init(raw)
    assert (init.uuid, init.channel_id, init.magic, init.version) == (UUID, 3, wire.MAGIC, 1)
    wire.validate_init(init, uuid=UUID, channels=4)


def test_ram_packet_golden() -> None:
    raw = wire.encode_ram_packet(page_size=PS, flags=0x04, packet_num=0x0102030405060708,
                                 ramblock="pc.ram", normal=[0x2000, 0x1000], zero=[0x5000],
                                 next_packet_size=1234)
    assert len(raw) == 1344
    assert raw[:12] == bytes.fromhex("11223344 00000001 00000004")
    assert raw[12:24] == bytes.fromhex("00000080 00000002 000004d2")
    assert raw[24:32] == bytes.fromhex("0102030405060708")
    assert raw[32:36] == bytes.fromhex("00000001")
    assert raw[36:64] == bytes(28)
    assert raw[64:70] == b"pc.ram" and raw[70:320] == bytes(250)
    assert raw[320:344] == bytes.fromhex("0000000000002000 0000000000001000 0000000000005000")
    assert raw[344:] == bytes(1344 - 344)
    pkt = wire.decode_ram_packet(raw, PS)
    assert (pkt.flags, pkt.pages_alloc, pkt.normal_pages, pkt.zero_pages) == (4, 128, 2, 1)
    assert pkt.next_packet_size == 1234 and pkt.packet_num == 0x0102030405060708
    assert pkt.normal_offsets.tolist() == [0x2000, 0x1000]
    assert pkt.zero_offsets.tolist() == [0x5000]
    assert pkt.block_name.rstrip("\0") == "pc.ram"


def test_sync_packet_golden() -> None:
    raw = wire.encode_sync_packet(7, PS)
    expected = bytearray(1344)
    expected[:12] = bytes.fromhex("11223344 00000001 00000001")
    expected[24:32] = struct.pack(">Q", 7)
    assert raw == expected
    pkt = wire.decode_ram_packet(raw, PS)
    assert pkt.is_sync and pkt.pages_alloc == 0


def test_device_state_golden() -> None:
    raw = wire.encode_device_state("0000:00:02.0/vfio", 1, 99)
    assert len(raw) == 276
    assert raw[:12] == bytes.fromhex("11223344 00000001 00000040")
    assert raw[268:] == bytes.fromhex("00000001 00000063")
    pkt = wire.decode_device_state(raw)
    assert pkt.name == "0000:00:02.0/vfio" and pkt.instance_id == 1
    wire.validate_device_state(pkt)


# --------------------------------------------------------------------------- init checks


@pytest.mark.parametrize(
    ("mutate", "field", "text"),
    [
        (lambda b: b.__setitem__(slice(0, 4), b"\x11\x22\x33\x45"), "magic",
         "received packet magic 11223345 expected 11223344"),
        (lambda b: b.__setitem__(slice(4, 8), b"\0\0\0\2"), "version",
         "received packet version 2 expected 1"),
        (lambda b: b.__setitem__(8, 0xFF), "uuid", "received uuid"),
        (lambda b: b.__setitem__(24, 4), "id", "received channel id 4 is greater than number "
                                                "of channels 4"),
    ],
)
def test_init_validation(mutate, field: str, text: str) -> None:
    raw = bytearray(wire.encode_init(UUID, 1))
    mutate(raw)
    with pytest.raises(WireError) as err:
        wire.validate_init(wire.decode_init(bytes(raw)), uuid=UUID, channels=4)
    assert err.value.field == field
    assert text in str(err.value)


def test_init_duplicate_and_short() -> None:
    init = wire.decode_init(wire.encode_init(UUID, 2))
    with pytest.raises(WireError, match="received id '2' already setup") as err:
        wire.validate_init(init, uuid=UUID, channels=4, seen={2})
    assert err.value.received == 2
    with pytest.raises(WireError, match="short channel init") as err:
        wire.decode_init(b"\x11\x22\x33\x44")
    assert (err.value.received, err.value.expected) == (4, 64)


# --------------------------------------------------------------------------- RAM packet checks


def _packet(**kw) -> wire.RamPacket:
    args = dict(page_size=PS, flags=0, packet_num=1, ramblock="pc.ram", normal=[0],
                zero=[], next_packet_size=PS)
    args.update(kw)
    return wire.decode_ram_packet(wire.encode_ram_packet(**args), PS)


def _validate(pkt: wire.RamPacket, code: int = 0) -> None:
    wire.validate_ram_packet(pkt, page_size=PS, block_lengths={b"pc.ram": 16 * PS},
                             method_code=code, max_payload=lambda n: n * PS)


def test_valid_packet_passes() -> None:
    _validate(_packet(normal=[0, PS], zero=[2 * PS], next_packet_size=2 * PS))


def _raw_packet(**fields) -> wire.RamPacket:
    pkt = _packet()
    for k, v in fields.items():
        setattr(pkt, k, v)
    return pkt


@pytest.mark.parametrize(
    ("pkt", "code", "field", "text"),
    [
        (_raw_packet(pages_alloc=129), 0, "pages_alloc",
         "received packet with 129 pages, expected 128"),
        (_raw_packet(pages_alloc=4, normal_pages=5), 0, "normal_pages",
         "received packet with 5 non-zero pages, which exceeds maximum expected pages 4"),
        (_raw_packet(normal_pages=100, zero_pages=29), 0, "zero_pages",
         "received packet with 29 zero pages, expected maximum 28"),
        (_raw_packet(ramblock=b"pc.rom".ljust(256, b"\0")), 0, "ramblock",
         "unknown ram block pc.rom"),
        (_packet(normal=[16 * PS]), 0, "offset", "offset too long 65536 (max 65536)"),
        (_packet(normal=[100]), 0, "offset", "offset 100 is not page aligned"),
        (_packet(flags=0x02), 0, "flags", "flags received 2 flags expected 0"),
        (_packet(), 0x04, "flags", "flags received 0 flags expected 4"),
        (_packet(next_packet_size=PS + 1), 0, "next_packet_size",
         "received unexpectedly large packet"),
        (_packet(flags=0x80), 0, "flags", "unknown flags 80"),
        (_packet(normal=[], zero=[0], next_packet_size=5), 0, "next_packet_size",
         "without normal pages carries a payload"),
    ],
)
def test_ram_packet_validation(pkt: wire.RamPacket, code: int, field: str, text: str) -> None:
    with pytest.raises(WireError) as err:
        _validate(pkt, code)
    assert err.value.field == field
    assert text in str(err.value)
    assert "received" in str(err.value) and "expected" in str(err.value)


def test_unterminated_block_name_is_cut_at_255() -> None:
    pkt = _raw_packet(ramblock=b"x" * 256)
    with pytest.raises(WireError, match="unknown ram block x{255}$|unknown ram block x{255} "):
        _validate(pkt)


def test_empty_packet_skips_block_and_flag_checks() -> None:
    pkt = _raw_packet(normal_pages=0, zero_pages=0, ramblock=b"nonexistent".ljust(256, b"\0"),
                      flags=0x02, next_packet_size=0)
    _validate(pkt, code=0)  # QEMU: a packet with no pages is never flag-checked


def test_header_checks() -> None:
    raw = bytearray(wire.encode_sync_packet(1, PS))
    raw[3] = 0
    with pytest.raises(WireError, match="received packet magic 11223300, expected 11223344"):
        wire.decode_ram_packet(bytes(raw), PS)
    with pytest.raises(WireError) as err:
        wire.decode_ram_packet(bytes(100), PS)
    assert err.value.field == "length"


@pytest.mark.parametrize(
    ("flags", "size", "name", "text"),
    [
        (0x41, 10, b"dev", "received SYNC device state packet"),
        (0x40, 0, b"dev", "received empty device state packet"),
        (0x40, 10, b"d" * 256, "unterminated multifd device state idstr"),
    ],
)
def test_device_state_validation(flags: int, size: int, name: bytes, text: str) -> None:
    raw = wire.DEVICE_STATE.pack(wire.MAGIC, wire.VERSION, flags, name, 0, size)
    with pytest.raises(WireError, match=text):
        wire.validate_device_state(wire.decode_device_state(raw))


def test_page_size_must_be_power_of_two() -> None:
    with pytest.raises(WireError) as err:
        wire.page_count(3000)
    assert err.value.field == "page_size"
    assert wire.page_count(65536) == 8


def test_offsets_round_trip_any_page_size() -> None:
    rng = np.random.default_rng(0)
    for ps in (512, 4096, 65536):
        count = wire.page_count(ps)
        offs = (rng.choice(10_000, size=count, replace=False) * ps).astype(np.uint64)
        raw = wire.encode_ram_packet(page_size=ps, flags=0, packet_num=3, ramblock="b",
                                     normal=offs[: count // 2], zero=offs[count // 2 :],
                                     next_packet_size=0)
        pkt = wire.decode_ram_packet(raw, ps)
        assert (pkt.offsets == offs).all()
