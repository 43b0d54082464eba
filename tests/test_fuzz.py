"""Fuzzing the decoders with hypothesis (short runs, in the default test run) and replaying
the inputs that once found bugs (tests/fuzz_corpus/<target>/*). The targets are differential
(fuzz/targets.py): each input is judged by the reference decoder of fuzz/reference.py, and the
project must accept what it accepts, decode it to the same values, and refuse what it refuses
naming the same field. Besides random inputs, every field of every packet is set to the values
on both sides of each rule (deterministic), so a check that is dropped or inverted fails here
whatever hypothesis draws. The long runs are the atheris harnesses in fuzz/
(``python fuzz/fuzz_<target>.py -atheris_runs=1000000``)."""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netkit import raw_packet, require_method

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import targets as fz  # noqa: E402

from multifd_core import wire  # noqa: E402
from multifd_core.engine.harness import MethodHarness  # noqa: E402
from multifd_core.wire import protocol

TARGETS = fz.targets()
CORPUS = Path(__file__).parent / "fuzz_corpus"
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed input with a few byte edits, an insertion and maybe a cut."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), mutated(fz.seed_inputs(name)))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_only_raises_project_errors(name: str) -> None:
    target = TARGETS[name]
    # Method decoders with software fallbacks (qpl, uadk, qatzip) cost milliseconds per
    # input: fewer examples there; atheris does the long runs.
    n = 40 if name.startswith("method_") and name[7:] not in ("none", "zlib", "zstd") else 150

    @settings(FAST, max_examples=n)
    @given(inputs(name))
    def check(data: bytes) -> None:
        fz.run(target, data)

    check()


def test_every_installed_method_is_fuzzed() -> None:
    for m in ("none", "zlib", "zstd", "lz4", "qpl", "uadk", "qatzip"):
        if m in fz.available_methods():
            assert f"method_{m}" in TARGETS
    assert "method_none" in TARGETS


OFFSETS = st.sampled_from([0, 4096, 8192, 63 * 4096, 64 * 4096, 4097, 2**63, 2**64 - 4096])


@FAST
@given(flags=st.sampled_from([0, 1, 2, 4, 0x40, 0x41, 0x80, 0x3E]),
       pages_alloc=st.integers(0, 140), normal=st.integers(0, 140), zero=st.integers(0, 140),
       size=st.sampled_from([0, 1, 4096, 8192, 2**31, 2**32 - 1]),
       name=st.sampled_from([b"ram", b"ra", b"r" * 256, b"ram\0junk", b""]),
       offsets=st.lists(OFFSETS, max_size=140),
       head=st.sampled_from([(wire.MAGIC, 1)] * 4 + [(wire.MAGIC, 0), (wire.MAGIC, 2),
                                                     (0x44332211, 1)]),
       selector=st.sampled_from([0, 4, 8, 12, 16, 20]))
def test_structured_ram_packets(flags: int, pages_alloc: int, normal: int, zero: int,
                                size: int, name: bytes, offsets: list[int],
                                head: tuple[int, int], selector: int) -> None:
    """Field-level generation, so most inputs reach the deep checks (offsets, sizes)."""
    pkt = raw_packet(flags=flags, pages_alloc=pages_alloc, normal=normal, size=size,
                     zero=zero, name=name, offsets=offsets[:128], magic=head[0],
                     version=head[1])
    fz.run(fz.ram_packet, bytes([selector]) + pkt)


# --------------------------------------------------------------------------- every rule's edges

PS = 4096
#: A valid data packet of the ram_packet target (4 KiB pages, method code 0): two normal
#: pages, one zero page, in the 64-page block "ram".
BASE = {"flags": 0, "pages_alloc": 128, "normal": 2, "zero": 1, "size": 2 * PS,
        "name": b"ram", "offsets": [0, PS, 2 * PS], "magic": wire.MAGIC,
        "version": wire.VERSION}
EDGES: list[tuple[str, object]] = [
    ("magic", wire.MAGIC ^ 1), ("magic", 0),
    ("version", 0), ("version", 2), ("version", 0x100),
    ("flags", 1), ("flags", 2), ("flags", 0x20), ("flags", 0x40), ("flags", 0x41),
    ("flags", 0x80), ("flags", 0x100), ("flags", 0x80000000),
    ("pages_alloc", 0), ("pages_alloc", 2), ("pages_alloc", 3), ("pages_alloc", 127),
    ("pages_alloc", 129), ("pages_alloc", 2**32 - 1),
    ("normal", 0), ("normal", 3), ("normal", 127), ("normal", 128), ("normal", 129),
    ("zero", 0), ("zero", 2), ("zero", 126), ("zero", 127), ("zero", 2**32 - 1),
    ("size", 0), ("size", 1), ("size", 2 * PS - 1), ("size", 2 * PS + 1), ("size", 2**32 - 1),
    ("name", b"ra"), ("name", b"ram\0junk"), ("name", b""), ("name", b"RAM"),
    ("name", b"r" * 255), ("name", b"r" * 256), ("name", b"r" * 254),
    ("offsets", [63 * PS, PS, 2 * PS]), ("offsets", [64 * PS, PS, 2 * PS]),
    ("offsets", [0, PS, 64 * PS]), ("offsets", [0, PS + 1, 2 * PS]),
    ("offsets", [0, PS, 2 * PS - 8]), ("offsets", [2**64 - PS, PS, 2 * PS]),
    ("offsets", [0, PS, 2 * PS, 64 * PS]),  # a slot past the counts is not an offset
]
CASES = [{**BASE, key: value} for key, value in EDGES] + [
    {**BASE, "normal": 0, "zero": 0, "size": 0, "name": b"nosuch", "offsets": [2**64 - 1]},
    {**BASE, "normal": 0, "zero": 0, "size": 1},
    {**BASE, "normal": 0, "zero": 3, "size": 0},
    {**BASE, "normal": 0, "zero": 3, "size": 1},
    {**BASE, "pages_alloc": 0, "normal": 0, "zero": 0, "size": 0, "flags": 1},
    {**BASE, "pages_alloc": 2, "normal": 3, "zero": 0},
    {**BASE, "pages_alloc": 3, "normal": 2, "zero": 2},
    {**BASE, "name": b"r" * 255, "offsets": [0, 0, 0], "size": 2 * PS},
    {**BASE, "name": b"r" * 255, "offsets": [0, PS, 0]},
]


@pytest.mark.parametrize("selector", [0, 4, 8, 12, 16, 20, 1, 2])
def test_ram_packet_rules_at_their_edges(selector: int) -> None:
    """One field at a time on both sides of each rule, for every method code and for 512 B
    and 8 KiB pages (selector bits), judged against the reference."""
    for case in CASES:
        fz.ram_packet(bytes([selector]) + raw_packet(**case))


def test_init_rules_at_their_edges() -> None:
    good = bytearray(wire.encode_init(fz.UUID, 2))
    cases = [bytes(good), bytes(good[:63]), bytes(good) + b"x"]
    for at, value in ((0, 0x44), (3, 0x45), (4, 1), (7, 0), (7, 2), (8, 1), (23, 0),
                      (24, 0), (24, 1), (24, 3), (24, 4), (24, 255), (25, 1), (63, 1)):
        raw = bytearray(good)
        raw[at] = value
        cases += [bytes(raw), bytes(raw) + b"\0"]  # the session uuid, then the packet's own
    for data in cases:
        fz.init_packet(data)


def test_device_state_rules_at_their_edges() -> None:
    good = wire.encode_device_state("0000:00:01.0/vfio", 7, 100)
    cases = [good, wire.encode_device_state("x", 0, 1),
             wire.encode_device_state("x", 0, 64 << 20),
             wire.encode_device_state("x", 0, (64 << 20) + 1),
             wire.encode_device_state("x", 0, 0), wire.encode_device_state("x", 0, 2**32 - 1),
             wire.encode_device_state("x", 0, 5, flags=0x41),
             wire.encode_device_state("x", 0, 5, flags=0x01),
             wire.encode_device_state("x", 0, 5, flags=0x42)]
    for at, value in ((0, 0), (7, 2), (12 + 255, ord("x")), (12 + 254, ord("x"))):
        raw = bytearray(good)
        raw[at] = value
        cases.append(bytes(raw))
    unterminated = bytearray(good)
    unterminated[12:268] = b"d" * 256
    cases += [bytes(unterminated), good[:200]]
    for data in cases:
        fz.device_state(data)


def test_session_frame_rules_at_their_edges() -> None:
    hello = fz.seed_inputs("session")[0]
    for at, value in ((0, ord("X")), (5, 2), (4, 1), (7, 0), (7, 10), (7, 4), (8, 0x10)):
        raw = bytearray(hello)
        raw[at] = value
        fz.session_frames(bytes(raw))
    for length in (protocol.MAX_BODY, protocol.MAX_BODY + 1):
        fz.session_frames(protocol.FRAME.pack(b"MFDS", 1, 1, length))


def _blocks(*items: tuple[object, object]) -> list[dict[str, object]]:
    return [{"name": n, "length": ln} for n, ln in items]


HELLO_EDGES: list[tuple[str, object]] = [
    ("uuid", "00" * 16), ("uuid", "0" * 31), ("uuid", "0" * 33), ("uuid", "0" * 32 + "\n"),
    ("uuid", "A" * 32), ("uuid", 5), ("uuid", None),
    ("page_size", 256), ("page_size", 512), ("page_size", 1 << 19), ("page_size", 1 << 20),
    ("page_size", 4097), ("page_size", 4096.0), ("page_size", True), ("page_size", "4096"),
    ("channels", 0), ("channels", 1), ("channels", 16), ("channels", 17), ("channels", True),
    ("channels", -1), ("channels", 2.0),
    ("blocks", []), ("blocks", {}), ("blocks", [5]), ("blocks", _blocks(("ram", PS)) * 2),
    ("blocks", _blocks(("", PS))), ("blocks", _blocks(("a" * 255, PS))),
    ("blocks", _blocks(("a" * 256, PS))), ("blocks", _blocks(("\u00e9" * 127, PS))),
    ("blocks", _blocks(("\u00e9" * 128, PS))), ("blocks", _blocks(("a\0b", PS))),
    ("blocks", _blocks((5, PS))), ("blocks", _blocks(("\ud800", PS))),
    ("blocks", _blocks(("a", 0))), ("blocks", _blocks(("a", -PS))),
    ("blocks", _blocks(("a", PS + 1))), ("blocks", _blocks(("a", PS // 2))),
    ("blocks", _blocks(("a", 1 << 30))), ("blocks", _blocks(("a", 1 << 30), ("b", PS))),
    ("blocks", _blocks(("a", True))), ("blocks", _blocks(("a", 4096.0))),
    ("blocks", _blocks((5, "x"))), ("blocks", _blocks(("", "x"))),
    ("blocks", _blocks(*((f"b{i}", PS) for i in range(4096)))),
    ("blocks", _blocks(*((f"b{i}", PS) for i in range(4097)))),
    ("offers", "none"), ("offers", [5]), ("offers", [{"name": 5, "code": 0}]),
    ("offers", [{"name": "none", "code": "0"}]), ("offers", [{"name": "none", "code": True}]),
    ("offers", [{"name": "none", "code": 0, "version": [1]}]), ("offers", []),
    ("offers", [{"name": "n" * 100, "code": 0, "version": "v" * 40}]),
    ("offers", [{"name": "none", "code": 0}] * 64 + [5]),
    ("method", 5), ("method", "zlib"), ("level", "1"), ("level", True), ("level", 3),
    ("level", 1.5),
]


@pytest.mark.parametrize(("key", "value"), HELLO_EDGES,
                         ids=[f"{k}-{i}" for i, (k, _) in enumerate(HELLO_EDGES)])
def test_hello_rules_at_their_edges(key: str, value: object) -> None:
    body = json.loads(fz.seed_inputs("hello")[0])
    body[key] = value
    fz.hello_json(json.dumps(body).encode())
    body.pop(key)
    fz.hello_json(json.dumps(body).encode())


@pytest.mark.parametrize("digests", [
    {"ram": "0" * 64, "pc.bios": "f" * 64}, {"ram": "0" * 64}, {"ram": "0" * 64, "pc.bios": 5},
    {"ram": "0" * 63, "pc.bios": "f" * 64}, {"ram": "0" * 64 + "\n", "pc.bios": "f" * 64},
    {"ram": "A" * 64, "pc.bios": "f" * 64}, [], "x"])
def test_digest_rules_at_their_edges(digests: object) -> None:
    done = protocol.encode(protocol.Msg.DONE, {"digests": digests})
    fz.session_frames(done)


def _method_payloads(name: str) -> list[bytes]:
    """Payloads of 3 pages a method made, and the same cut, extended, flipped and claimed
    for the wrong page count; then two packets on one channel."""
    pages = np.zeros((3, PS), dtype=np.uint8)
    pages[0, :100] = 7
    pages[1] = np.arange(PS) % 251
    spec = fz.method_targets()[f"method_{name}"]
    with MethodHarness(fz._method(*spec[:2])) as h:
        first, second = h.encode(pages), h.encode(pages[::-1])
    out = []
    for n in (2, 3, 4):
        sel = bytes([n - 1])
        out += [sel + first, sel + first[:-1], sel + first[:len(first) // 2], sel + first + b"\0",
                sel + first + b"\0\0\xff\xff", sel + b"", sel + first + fz.SEPARATOR + second,
                sel + first + fz.SEPARATOR + first, sel + first + fz.SEPARATOR + second[:-1]]
        for at in (0, 1, 4, len(first) // 2, len(first) - 5, len(first) - 1):
            flipped = bytearray(first)
            flipped[at] ^= 0x10
            out.append(sel + bytes(flipped))
    return out + _crafted_payloads(name)


def _crafted_payloads(name: str) -> list[bytes]:
    """Payloads another encoder could send, on both sides of the method's rules."""
    page = bytes(range(256)) * (PS // 256)
    if name == "zlib":
        done = zlib.compressobj(1)
        finished = done.compress(page) + done.flush()  # Z_FINISH: the stream ended
        return [b"\0" + finished, b"\0" + finished[:-4], b"\0" + zlib.compress(page)[:-4]]
    if name == "zstd":
        import zstandard

        frame = zstandard.ZstdCompressor().compress(page)  # a frame that ends
        return [b"\0" + frame, b"\0" + frame + fz.SEPARATOR + frame, b"\1" + frame + frame]
    if name in ("qpl", "uadk"):
        blob = zlib.compress(page, 1)
        if name == "qpl":
            blob = blob[2:-4]  # raw DEFLATE
        out = []
        for extra in (b"", b"\0", b"\0" * (PS + 1 - len(blob))):  # trailing bytes; len PS+1
            padded = blob + extra
            out.append(b"\0" + len(padded).to_bytes(4, "big") + padded)
        raw = len(page).to_bytes(4, "big") + page
        return out + [b"\0" + raw, b"\1" + raw + raw, b"\0" + (PS + 1).to_bytes(4, "big") + page
                      + b"x", b"\0" + bytes(4) + page]
    if name == "qatzip":
        member = gzip.compress(page)
        return [b"\0" + member, b"\1" + member + member, b"\0" + member + b"\0" * 4,
                b"\0" + member[:-1], b"\0" + member[:-8], b"\1" + member[:-8] + member]
    if name == "none":
        return [b"\0" + page, b"\0" + page[:-1], b"\0" + page + b"x", b"\1" + page]
    return []


@pytest.mark.parametrize("name", sorted(fz.ref.METHODS))
def test_method_payload_edges(name: str) -> None:
    require_method(name)
    target = fz.targets()[f"method_{name}"]
    for data in _method_payloads(name):
        target(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)
HELLO_KEYS = ["uuid", "page_size", "channels", "blocks", "offers", "method", "level"]


@FAST
@given(key=st.sampled_from(HELLO_KEYS + ["blocks.name", "blocks.length", "offers.code"]),
       value=JSON)
def test_hello_with_one_field_replaced(key: str, value: object) -> None:
    body = json.loads(fz.seed_inputs("hello")[0])
    if "." in key:
        outer, inner = key.split(".")
        body[outer][0][inner] = value
    else:
        body[key] = value
    fz.run(fz.hello_json, json.dumps(body).encode())


def test_known_regressions_are_refused() -> None:
    """Bugs found while fuzzing the session layer (fixed in protocol.py)."""
    with pytest.raises(protocol.WireError, match="not valid JSON"):
        protocol.decode_body(b"[" * 100_000)  # RecursionError escaped before
    body = json.loads(fz.seed_inputs("hello")[0])
    body["blocks"][0]["name"] = "\ud800"  # lone surrogate: UnicodeEncodeError escaped
    with pytest.raises(protocol.WireError) as err:
        protocol.parse_hello(body)
    assert err.value.field == "blocks.name"


def _corpus() -> list[tuple[str, Path]]:
    if not CORPUS.is_dir():
        return []
    return [(d.name, f) for d in sorted(CORPUS.iterdir()) if d.is_dir()
            for f in sorted(d.iterdir()) if f.is_file()]


@pytest.mark.parametrize(("name", "path"), _corpus(), ids=lambda v: getattr(v, "name", v))
def test_corpus_replays(name: str, path: Path) -> None:
    if name.startswith("method_"):
        require_method(name.removeprefix("method_").split("_")[0])  # fails under CI
    assert name in TARGETS, f"no fuzz target {name} for tests/fuzz_corpus/{name}"
    fz.run(TARGETS[name], path.read_bytes())


def test_corpus_is_not_empty() -> None:
    assert len(_corpus()) >= 2
