"""Fuzz targets: every decoder a peer can reach, fed raw bytes.

A target returns normally or raises a ``MultiFDError`` (the project's refusal); anything else
escaping is a bug, and so is an ``AssertionError`` from the extra checks here (a validated
packet that still points outside its block, a decoder that returns the wrong number of pages).
Shared by the atheris harnesses in this directory and by tests/test_fuzz.py, which replays
tests/fuzz_corpus/.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache, lru_cache

import numpy as np

from multifd_core import protocol, wire
from multifd_core.errors import MultiFDError
from multifd_core.harness import MethodHarness
from multifd_core.method import MethodOptions
from multifd_core.pages import offsets_to_index
from multifd_core.registry import MethodRegistry, default_registry

UUID = bytes(range(16))
BLOCK_PAGES = 64
PAGE_SIZES = (4096, 512, 8192, 65536)


def _page_size(selector: int) -> int:
    return PAGE_SIZES[selector % len(PAGE_SIZES)]


def init_packet(data: bytes) -> None:
    init = wire.decode_init(data[:wire.INIT_LEN])
    wire.validate_init(init, uuid=UUID if data[-1:] != b"\0" else init.uuid, channels=4,
                       seen={1})
    assert 0 <= init.channel_id < 4 and init.channel_id != 1


def ram_packet(data: bytes) -> None:
    if not data:
        return
    ps = _page_size(data[0])
    plen = wire.ram_packet_len(ps)
    body = data[1:plen + 1].ljust(plen, b"\0")
    pkt = wire.decode_ram_packet(body, ps)
    blocks = {b"ram": BLOCK_PAGES * ps, b"r" * 255: ps}
    code = data[1] & wire.COMPRESSION_MASK if len(data) > 1 else 0
    wire.validate_ram_packet(pkt, page_size=ps, block_length=blocks.get, method_code=code,
                             max_payload=lambda n: n * ps)
    n = pkt.normal_pages + pkt.zero_pages
    assert n <= wire.page_count(ps) and pkt.next_packet_size <= pkt.normal_pages * ps
    if n:
        name = wire.block_name(pkt.ramblock + b"\0")
        idx = offsets_to_index(pkt.offsets[:n], ps)
        assert int(idx.max()) * ps < blocks[name] and int(idx.min()) >= 0


def device_state(data: bytes) -> None:
    pkt = wire.decode_device_state(data[:wire.DEVICE_STATE_LEN].ljust(
        wire.DEVICE_STATE_LEN, b"\0"))
    wire.validate_device_state(pkt, max_payload=64 << 20)
    assert 0 < pkt.next_packet_size <= 64 << 20
    pkt.name.encode()


@lru_cache(maxsize=1)
def _registry():  # noqa: ANN202
    # Only methods whose availability check is cheap: the hardware plugins probe for their
    # libraries on every available() call (tens of ms), which would starve the fuzzer.
    return MethodRegistry(only=["zlib", "zstd"])


def session_frames(data: bytes) -> None:
    """Frames as the receiver reads them: header, body, then what each message carries."""
    pos = 0
    for _ in range(4):
        if len(data) - pos < protocol.FRAME_LEN:
            return
        kind, length = protocol.decode_frame(data[pos:pos + protocol.FRAME_LEN])
        pos += protocol.FRAME_LEN
        body = protocol.decode_body(data[pos:pos + length])
        pos += length
        if kind is protocol.Msg.HELLO:
            hello = protocol.parse_hello(body, max_channels=16, max_total=1 << 30)
            assert sum(ln for _, ln in hello.blocks) <= 1 << 30
            for name, _ in hello.blocks:
                name.encode()
            try:
                protocol.choose_method(hello, _registry(), None)
            except MultiFDError:
                pass
        elif kind is protocol.Msg.DONE:
            protocol.parse_digests(body, ["ram", "pc.bios"])


def hello_json(data: bytes) -> None:
    """A HELLO body straight to the JSON layer (the frame header already passed)."""
    protocol.parse_hello(protocol.decode_body(data), max_channels=16, max_total=1 << 30)


@cache
def _method(name: str):  # noqa: ANN202
    return default_registry().create(name, MethodOptions(page_size=4096))


@cache
def _harness(name: str) -> MethodHarness:
    return MethodHarness(_method(name))


def method_payload(name: str) -> Callable[[bytes], None]:
    """``data[0]`` picks the page count (1..128), ``data[1:]`` is the payload of a first
    packet on a fresh channel; a second packet on the same channel follows a ``ff fe fd``
    separator (stateful streams)."""

    def target(data: bytes) -> None:
        if not data:
            return
        h = _harness(name)
        h.reset_receiver()  # each input starts on a fresh channel
        rest = data[1:]
        for part in rest.split(b"\xff\xfe\xfd", 2)[:2]:
            n = data[0] % 128 + 1
            out = h.decode(part, n)
            assert out.shape == (n, 4096)

    target.__name__ = f"method_{name}"
    return target


def qemu_stream(data: bytes) -> None:
    from multifd_core.qemu import stream

    reader = stream.MainStreamReader(page_size=4096)
    step = 1 + (data[0] % 97 if data else 0)
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
        for _ in reader.events():
            pass
    reader.close()


def available_methods() -> list[str]:
    reg = default_registry()
    return [e.name for e in reg.entries() if e.cls.available()[0]]


def targets() -> dict[str, Callable[[bytes], None]]:
    out: dict[str, Callable[[bytes], None]] = {
        "init": init_packet, "ram_packet": ram_packet, "device_state": device_state,
        "session": session_frames, "hello": hello_json,
    }
    for name in available_methods():
        out[f"method_{name}"] = method_payload(name)
    try:
        from multifd_core.qemu import stream  # noqa: F401

        out["qemu_stream"] = qemu_stream
    except ImportError:
        pass
    return out


def run(target: Callable[[bytes], None], data: bytes) -> None:
    """Run one input: the project's refusals are fine, anything else propagates."""
    try:
        target(data)
    except MultiFDError:
        pass


def seed_inputs(name: str) -> list[bytes]:
    """A few valid inputs per target, so fuzzers start inside the format."""
    ps = 4096
    if name == "init":
        return [wire.encode_init(UUID, 0) + b"\x01", wire.encode_init(UUID, 3)]
    if name == "ram_packet":
        pkt = wire.encode_ram_packet(page_size=ps, flags=0, packet_num=1, ramblock="ram",
                                     normal=[0, ps], zero=[2 * ps], next_packet_size=2 * ps)
        return [b"\x00" + bytes(pkt), b"\x00" + bytes(wire.encode_sync_packet(5, ps))]
    if name == "device_state":
        return [wire.encode_device_state("0000:00:01.0/vfio", 0, 100)]
    if name in ("session", "hello"):
        hello = protocol.Hello(UUID, ps, 2, [("ram", 64 * ps)],
                               [protocol.Offer("none", 0, "0.1")], None, None)
        frame = protocol.encode(protocol.Msg.HELLO, hello.to_body())
        done = protocol.encode(protocol.Msg.DONE, {"digests": {"ram": "0" * 64,
                                                               "pc.bios": "f" * 64}})
        if name == "hello":
            return [frame[protocol.FRAME_LEN:]]
        return [frame + done]
    if name.startswith("method_"):
        m = _method(name[7:])
        pages = np.zeros((3, ps), dtype=np.uint8)
        pages[0, :100] = 7
        pages[1] = np.arange(ps) % 251
        with MethodHarness(m) as h:
            return [b"\x02" + h.encode(pages)]
    if name == "qemu_stream":
        from multifd_core.qemu import stream

        return [b"\x10" + stream.encode_header() + struct.pack(">B", stream.EOF)]
    return [b""]
