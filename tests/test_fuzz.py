"""Fuzzing the decoders with hypothesis (short runs, in the default test run) and replaying
the inputs that once found bugs (tests/fuzz_corpus/<target>/*). Only the project's own errors
(MultiFDError subclasses) may escape a decoder. The long runs are the atheris harnesses in
fuzz/ (``python fuzz/fuzz_<target>.py -atheris_runs=1000000``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netkit import raw_packet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import targets as fz  # noqa: E402

from multifd_core import protocol  # noqa: E402

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
       offsets=st.lists(OFFSETS, max_size=140))
def test_structured_ram_packets(flags: int, pages_alloc: int, normal: int, zero: int,
                                size: int, name: bytes, offsets: list[int]) -> None:
    """Field-level generation, so most inputs reach the deep checks (offsets, sizes)."""
    pkt = raw_packet(flags=flags, pages_alloc=pages_alloc, normal=normal, size=size,
                     zero=zero, name=name, offsets=offsets[:128])
    fz.run(fz.ram_packet, b"\x00" + pkt)


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
    if name not in TARGETS:
        pytest.skip(f"target {name} not available here (its method is not installed)")
    fz.run(TARGETS[name], path.read_bytes())


def test_corpus_is_not_empty() -> None:
    assert len(_corpus()) >= 2
