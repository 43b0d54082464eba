"""Fuzz targets: every decoder a peer can reach, fed raw bytes, judged by a reference.

Each target decodes its input with the project's code and with the reference decoder of
``reference.py`` (written from the specs, independent of the project's checks) and requires
both to agree: the project accepts exactly what the reference accepts and decodes it to the same
values and pages, and refuses what the reference refuses with a ``WireError`` naming the same
field. A disagreement is an ``AssertionError``; so is anything else escaping but a
``MultiFDError`` (the project's refusal). Methods without a reference here (lz4) and the QEMU
main stream only have to raise nothing else. Shared by the atheris harnesses in this
directory and by tests/test_fuzz.py, which replays tests/fuzz_corpus/.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import numpy as np
import reference as ref

from multifd_core import wire
from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MultiFDError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.session.negotiate import negotiate_method
from multifd_core.wire import protocol

UUID = bytes(range(16))
BLOCK_PAGES = 64
PAGE_SIZES = (4096, 512, 8192, 65536)
#: Method codes a RAM packet is checked against, picked by the selector byte.
CODES = (0x00, 0x02, 0x04, 0x08, 0x10, 0x20)
SEPARATOR = b"\xff\xfe\xfd"
DIGEST_NAMES = ["ram", "pc.bios"]


def _page_size(selector: int) -> int:
    return PAGE_SIZES[selector % len(PAGE_SIZES)]


def judge(what: str, ours: Callable[[], Any], theirs: Callable[[], Any],
          same: Callable[[Any, Any], bool] = lambda a, b: a == b,
          fields: bool = True) -> Any:
    """Run the project's decoder and the reference; they must agree (see the module doc).
    Returns the project's value, or None when both refused."""
    try:
        got: Any = ours()
    except MultiFDError as exc:
        got = exc
    try:
        want: Any = theirs()
    except ref.Reject as exc:
        want = exc
    if isinstance(want, ref.Reject):
        assert isinstance(got, MultiFDError), \
            f"{what}: accepted what the reference refuses ({want.field}): {got!r}"
        field = getattr(got, "field", None)
        assert not fields or field == want.field, \
            f"{what}: refused for {field}, the reference for {want.field}: {got}"
        return None
    assert not isinstance(got, MultiFDError), \
        f"{what}: refused what the reference accepts ({want!r}): {got}"
    assert same(got, want), f"{what}: decoded {got!r}, the reference {want!r}"
    return got


def init_packet(data: bytes) -> None:
    """An init packet (the rest of the input is ignored); a last byte of 0 makes the session
    uuid the packet's own, so inputs reach the id checks."""
    raw = data[:wire.INIT_LEN]
    uuid = raw[8:24] if data[-1:] == b"\0" and len(raw) == wire.INIT_LEN else UUID

    def ours() -> int:
        init = wire.decode_init(raw)
        wire.validate_init(init, uuid=uuid, channels=4, seen={1})
        return init.channel_id

    judge("init", ours, lambda: ref.init_packet(raw, uuid=uuid, channels=4, seen={1}))


def ram_packet(data: bytes) -> None:
    """``data[0]``: page size (bits 0-1) and the session's method code (bits 2-4); then a
    RAM packet, padded with zeros to its full length. Two blocks: "ram" of 64 pages and a
    one-page block with a 255-byte name."""
    if not data:
        return
    ps = _page_size(data[0])
    code = CODES[(data[0] >> 2) % len(CODES)]
    plen = wire.ram_packet_len(ps)
    body = data[1:plen + 1].ljust(plen, b"\0")
    blocks = {b"ram": BLOCK_PAGES * ps, b"r" * 255: ps}

    def max_payload(normal: int) -> int:
        return normal * ps

    def ours() -> ref.RamPacket:
        pkt = wire.decode_ram_packet(body, ps)
        wire.validate_ram_packet(pkt, page_size=ps, block_lengths=blocks,
                                 method_code=code, max_payload=max_payload)
        has_pages = pkt.normal_pages + pkt.zero_pages > 0
        return ref.RamPacket(pkt.flags, pkt.packet_num, pkt.next_packet_size,
                             wire.block_name(pkt.ramblock) if has_pages else None,
                             tuple(pkt.normal_offsets.tolist()),
                             tuple(pkt.zero_offsets.tolist()))

    def theirs() -> ref.RamPacket:
        normal = struct.unpack_from(">I", body, 16)[0]
        return ref.ram_packet(body, page_size=ps, blocks=blocks, method_code=code,
                              max_payload=max_payload(normal))

    judge("ram packet", ours, theirs)


def device_state(data: bytes) -> None:
    raw = data[:wire.DEVICE_STATE_LEN].ljust(wire.DEVICE_STATE_LEN, b"\0")

    def ours() -> ref.DeviceState:
        pkt = wire.decode_device_state(raw)
        wire.validate_device_state(pkt, max_payload=64 << 20)
        return ref.DeviceState(wire.block_name(pkt.idstr), pkt.instance_id,
                               pkt.next_packet_size)

    pkt = judge("device state", ours, lambda: ref.device_state(raw, max_payload=64 << 20))
    if pkt is not None:
        wire.decode_device_state(raw).name.encode()


@lru_cache(maxsize=1)
def _registry():  # noqa: ANN202
    # Only methods whose availability check is cheap: the hardware plugins probe for their
    # libraries on every available() call (tens of ms), which would starve the fuzzer.
    return MethodRegistry(only=["zlib", "zstd"])


def _hello_fields(hello: protocol.Hello) -> ref.Hello:
    return ref.Hello(hello.uuid, hello.page_size, hello.channels, tuple(hello.blocks),
                     tuple((o.name, o.code, o.version) for o in hello.offers), hello.method,
                     hello.level)


def _hello(raw: bytes) -> protocol.Hello | None:
    """A HELLO body through both layers (JSON, then fields), judged at each."""
    limits = {"max_channels": 16, "max_total": 1 << 30}
    body = judge("session body", lambda: protocol.decode_body(raw), lambda: ref.body(raw))
    if body is None:
        return None
    parsed: list[protocol.Hello] = []

    def ours() -> ref.Hello:
        parsed.append(protocol.parse_hello(body, **limits))
        return _hello_fields(parsed[0])

    if judge("hello", ours, lambda: ref.hello(body, **limits)) is None:
        return None
    return parsed[0]


def session_frames(data: bytes) -> None:
    """Frames as the receiver reads them: header, body, then what each message carries."""
    pos = 0
    for _ in range(4):
        if len(data) - pos < protocol.FRAME_LEN:
            return
        head = data[pos:pos + protocol.FRAME_LEN]
        framed = judge("frame", lambda h=head: protocol.decode_frame(h),
                       lambda h=head: ref.frame(h), same=lambda a, b: (int(a[0]), a[1]) == b)
        if framed is None:
            return
        kind, length = framed
        pos += protocol.FRAME_LEN
        raw = data[pos:pos + length]
        pos += length
        if kind is protocol.Msg.HELLO:
            hello = _hello(raw)
            if hello is None:
                return
            assert sum(ln for _, ln in hello.blocks) <= 1 << 30
            for name, _ in hello.blocks:
                name.encode()
            try:
                negotiate_method(hello, _registry(), None)
            except MultiFDError:
                pass
        elif kind is protocol.Msg.DONE:
            body = judge("session body", lambda r=raw: protocol.decode_body(r),
                         lambda r=raw: ref.body(r))
            if body is None:
                return
            judge("digests", lambda b=body: protocol.parse_digests(b, DIGEST_NAMES),
                  lambda b=body: ref.digests(b, DIGEST_NAMES))


def hello_json(data: bytes) -> None:
    """A HELLO body straight to the JSON layer (the frame header already passed)."""
    _hello(data)


@cache
def _method(name: str, engine: str | None = None):  # noqa: ANN202
    return default_registry().create(name, MethodOptions(page_size=4096, engine=engine))


@cache
def _harness(name: str, engine: str | None = None) -> MethodHarness:
    return MethodHarness(_method(name, engine))


def method_targets() -> dict[str, tuple[str, str | None, bool]]:
    """Target name -> (method, engine or None for the default, judged by a reference).

    qatzip is judged on its software engine. libqatzip (QEMU's own decoder) accepts a gzip
    member whose 8-byte trailer is cut short, skipping its CRC check, which the reference
    refuses; that engine gets a target of its own that only checks for crashes."""
    out: dict[str, tuple[str, str | None, bool]] = {
        f"method_{m}": (m, None, m in ref.METHODS) for m in available_methods()}
    if "method_qatzip" in out:
        out["method_qatzip"] = ("qatzip", "software", True)
        cls = default_registry().get("qatzip").cls
        if any(e.name == "libqatzip" and e.available for e in cls.engines()):
            out["method_qatzip_libqatzip"] = ("qatzip", "libqatzip", False)
    return out


def method_payload(name: str, engine: str | None = None, judged: bool = True
                   ) -> Callable[[bytes], None]:
    """``data[0]`` picks the page count (1..128), ``data[1:]`` is the payload of a first
    packet on a fresh channel; a second packet on the same channel follows a ``ff fe fd``
    separator (stateful streams). Each packet is judged against the method's reference
    decoder (``judged``), on a reference channel with the same history."""
    reference = ref.METHODS.get(name) if judged else None

    def target(data: bytes) -> None:
        if not data:
            return
        h = _harness(name, engine)
        h.reset_receiver()  # each input starts on a fresh channel
        channel = reference(4096) if reference is not None else None
        n = data[0] % 128 + 1
        for part in data[1:].split(SEPARATOR, 2)[:2]:
            if channel is None:
                out = h.decode(part, n)
                assert out.shape == (n, 4096)
                continue
            pages = judge(f"method {name}", lambda p=part: h.decode(p, n).tobytes(),
                          lambda p=part: channel.packet(p, n), fields=False)
            if pages is None:
                return  # a refused packet ends the channel

    target.__name__ = f"method_{name}" + (f"_{engine}" if engine else "")
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
    for target, spec in method_targets().items():
        out[target] = method_payload(*spec)
    try:
        from multifd_core.qemu import stream  # noqa: F401

        out["qemu_stream"] = qemu_stream
    except ImportError:
        pass
    return out


def run(target: Callable[[bytes], None], data: bytes) -> None:
    """Run one input: the project's refusals are fine (where a target has a reference it
    has already judged them), anything else propagates."""
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
        m = _method(*method_targets()[name][:2])
        pages = np.zeros((3, ps), dtype=np.uint8)
        pages[0, :100] = 7
        pages[1] = np.arange(ps) % 251
        with MethodHarness(m) as h:
            return [b"\x02" + h.encode(pages)]
    if name == "qemu_stream":
        from multifd_core.qemu import stream

        return [b"\x10" + stream.encode_header() + struct.pack(">B", stream.EOF)]
    return [b""]
