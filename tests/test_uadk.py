"""The uadk method plugin (multifd-uadk): QEMU's per-page container with zlib-wrapped blobs.

No UADK library or HiSilicon device exists here (Debian packages neither). Tested: the
software engine (raw sender as QEMU without hardware; zlib decoding of what UADK hardware
sends), the opt-in software compression (per packet through the C helper multifd-pagecodec, or
per page in Python: both paths byte for byte against each other), the declarations' layout and
every library-missing path. The UADK session code is untested.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import pytest
from layoutkit import check_optional_header

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import LibraryNotFoundError, MethodError, MultiFDError
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import (
    MethodConformance,
    in_ci,
    make_pages,
    mixed_pages,
    require,
    system_zlib,
)

try:
    import multifd_pagecodec as pagecodec
    from multifd_uadk import _ffi, engines
    from multifd_uadk.method import Uadk
except ImportError:  # pragma: no cover - depends on the environment
    if in_ci():
        raise
    pytest.skip("multifd-uadk is not installed: pip install -e plugins/uadk",
                allow_module_level=True)

PAGE = 4096


def method(engine: str | None = None, compress: bool = False, native: bool = True) -> Uadk:
    return Uadk(MethodOptions(page_size=PAGE, engine=engine,
                              extra={"software_compress": compress, "native": native}))


def need_native() -> None:
    require(pagecodec.why_not("zlib") is None,
            f"the uadk software engine runs its Python per-page loop: {pagecodec.why_not('zlib')}")


def image(n: int, seed: int = 1) -> np.ndarray:
    return mixed_pages(n, PAGE, np.random.default_rng(seed))


def payload_of(blobs: list[bytes], lens: list[int] | None = None) -> bytes:
    lens = [len(b) for b in blobs] if lens is None else lens
    return np.asarray(lens, dtype=">u4").tobytes() + b"".join(blobs)


def hardware_like(pages: np.ndarray, trailer: bool = True, header: bytes = b"") -> bytes:
    """What a UADK sender with hardware puts on the wire: zlib stream per page, raw when it
    does not shrink."""
    blobs = []
    for page in pages:
        blob = zlib.compress(page.tobytes(), 1)
        if header:
            blob = header + blob[2:]
        if not trailer:
            blob = blob[:-4]
        blobs.append(blob if len(blob) < PAGE else page.tobytes())
    return payload_of(blobs)


class TestUadkConformance(MethodConformance):
    """The default software engine: every page raw, as QEMU sends without hardware."""

    method_cls = Uadk
    stateful = False
    releases_gil = False
    gil_reason = ("the software sender has no codec (pages go raw, as QEMU without UADK "
                  "sends them); only Python buffer copies run under the harness")


class TestUadkSoftwareCompressConformance(MethodConformance):
    """The opt-in software compression (zlib per page)."""

    method_cls = Uadk
    options = {"extra": {"software_compress": True}}
    stateful = False
    # The C helper: one call a packet, GIL released (measured 0.99; the per-page loop 0.94).
    gil_min_runnable = 0.9 if pagecodec.why_not("zlib") is None else 0.8


# ---------------------------------------------------------------- format and interop

def test_software_sender_sends_every_page_raw():
    pages = image(20, 2)
    with MethodHarness(method()) as h:
        payload = h.encode(pages)
    assert payload == np.full(20, PAGE, ">u4").tobytes() + pages.tobytes()


def test_software_compress_writes_zlib_streams():
    pages = make_pages("text", 3, PAGE, np.random.default_rng(3))
    with MethodHarness(method(compress=True)) as h:
        payload = h.encode(pages)
    lens = np.frombuffer(payload[:12], ">u4").tolist()
    blob = payload[12:12 + lens[0]]
    assert blob[:2] == b"\x78\x01" and zlib.decompress(blob) == pages[0].tobytes()


@pytest.mark.parametrize("trailer", [True, False])
@pytest.mark.parametrize("header", [b"", b"\x78\x9c", b"\x00\x00"])
def test_decodes_what_uadk_hardware_sends(trailer, header):
    """QEMU with UADK -> us: zlib blobs, first two bytes skipped unseen, Adler-32 optional."""
    pages = image(64, 4)
    with MethodHarness(method()) as h:
        assert np.array_equal(h.decode(hardware_like(pages, trailer, header), 64), pages)


# ---------------------------------------------------------------- the C helper

def test_native_helper_is_in_use():
    """The software engine runs the C helper, one call a packet (in CI it must)."""
    need_native()
    sw = {e.name: e for e in Uadk.engines()}["software"]
    assert "native per packet" in sw.library_version and "native per-packet helper" in sw.reason
    made = engines.create("software", PAGE, 0, 128, compress=True, software_compress=True)
    assert made.native is not None
    assert engines.create("software", PAGE, 0, 128, compress=True, native=False).native is None


@pytest.mark.parametrize("compress", [True, False])
def test_native_payload_is_byte_identical_to_the_python_loop(compress):
    need_native()
    rng = np.random.default_rng(7)
    pages = np.concatenate([mixed_pages(200, PAGE, rng), make_pages("random", 10, PAGE, rng)])
    pages = pages[rng.permutation(len(pages))]
    with MethodHarness(method(compress=compress)) as a, \
            MethodHarness(method(compress=compress, native=False)) as b:
        for start in (0, 128, 210 - 5):
            chunk = pages[start:start + 128]
            payload = a.encode(chunk)
            assert payload == b.encode(chunk), (compress, start)
            assert np.array_equal(b.decode(payload, len(chunk)), chunk)
            assert np.array_equal(a.decode(payload, len(chunk)), chunk)


def test_native_and_python_loop_refuse_alike():
    need_native()
    text = make_pages("text", 2, PAGE, np.random.default_rng(8))
    good = zlib.compress(text[0].tobytes(), 1)
    flipped = bytearray(zlib.compress(text[1].tobytes(), 1))
    flipped[12] ^= 0xFF
    unfinished = zlib.compressobj(1)
    partial = unfinished.compress(text[1].tobytes()) + unfinished.flush(zlib.Z_SYNC_FLUSH)
    cases = {
        "flipped": [good, bytes(flipped)],
        "random": [good, b"\x78\x01" + bytes(range(200))],
        "two bytes": [good, b"\x78\x01"],
        "header plus one byte": [b"\x78\x01\x03"],
        "short": [zlib.compress(text[0].tobytes()[:100], 1)],
        "unfinished": [good, partial],
        "bomb": [zlib.compress(bytes(3 << 20), 9)],
        "no trailer": [good[:-4]],
    }
    for name, blobs in cases.items():
        payload, n = payload_of(blobs), len(blobs)
        outcomes = []
        for native in (True, False):
            with MethodHarness(method(native=native)) as h:
                try:
                    outcomes.append(h.decode(payload, n).tobytes())
                except MethodError as e:
                    outcomes.append((str(e), e.field, e.received, e.expected))
        assert outcomes[0] == outcomes[1], name


# ---------------------------------------------------------------- bad input

def refused(payload: bytes, n: int, match: str) -> MethodError:
    with MethodHarness(method()) as h, pytest.raises(MethodError, match=match) as e:
        h.decode(payload, n)
    return e.value


def test_length_array_checks():
    pages = make_pages("text", 4, PAGE, np.random.default_rng(5))
    good = hardware_like(pages)
    lens = np.frombuffer(good[:16], ">u4").tolist()
    blobs = []
    pos = 16
    for ln in lens:
        blobs.append(good[pos:pos + ln])
        pos += ln
    assert refused(good[:16], 4, "cannot hold").field == "next_packet_size"
    assert refused(payload_of(blobs, [PAGE + 1] + lens[1:]), 4, "4097").field == "len[0]"
    assert refused(payload_of(blobs, lens[:3] + [0]), 4, "blob length 0").field == "len[3]"
    refused(payload_of(blobs, lens[:3] + [lens[3] + 1]), 4, "add up")


def test_corrupt_short_and_bomb_blobs():
    text = make_pages("text", 1, PAGE, np.random.default_rng(6))[0].tobytes()
    blob = bytearray(zlib.compress(text, 1))
    blob[10] ^= 0xFF
    refused(payload_of([bytes(blob)]), 1, "failed decompression|decompressed length")
    refused(payload_of([zlib.compress(text[:100], 1)]), 1, "decompressed length error")
    refused(payload_of([b"\x78"]), 1, "too short")
    bomb = zlib.compress(bytes(3 << 20), 9)
    assert len(bomb) < PAGE
    e = refused(payload_of([bomb]), 1, "decompressed length error")
    assert e.received == PAGE + 1  # stopped one byte past the page


# ---------------------------------------------------------------- engine choice, library

def test_uadk_unavailable_here_and_software_chosen():
    info = {e.name: e for e in Uadk.engines()}
    assert set(info) == {"uadk", "software"} and info["uadk"].kind == "hardware"
    if not info["uadk"].available:
        assert method().engine == "software"
        with pytest.raises(MultiFDError, match="not available"):
            method("uadk")


def test_forced_software(monkeypatch):
    monkeypatch.setenv(engines.ENV_ENGINE, "software")
    info = {e.name: e for e in Uadk.engines()}
    assert not info["uadk"].available and "forced" in info["uadk"].reason
    assert method().engine == "software"


def test_library_missing(monkeypatch, tmp_path):
    missing = tmp_path / "libwd_comp.so.2"
    monkeypatch.setenv(_ffi.SPEC.env, str(missing))
    with pytest.raises(LibraryNotFoundError) as err:
        _ffi.load()
    text = str(err.value)
    assert "MULTIFD_UADK_LIBRARY" in text and str(missing) in text and "Linaro/uadk" in text
    info = {e.name: e for e in Uadk.engines()}
    assert not info["uadk"].available and "no library" in info["uadk"].reason


def test_library_that_is_not_uadk(monkeypatch):
    monkeypatch.setenv(_ffi.SPEC.env, system_zlib())
    with pytest.raises(LibraryNotFoundError, match="no symbol wd_comp_init2_"):
        _ffi.load()


# ---------------------------------------------------------------- the binding's ABI

# Layout of Linaro/uadk wd_comp.h / wd_sched.h / wd.h structs on LP64 (gcc 12), probed with
# multifd_core.layout against Linaro/uadk 97d643e. The session setup and sched_params are the
# newest forms (mm_ops, mm_type; dev_id); older UADK reads only their first 24 / 16 bytes.
LAYOUT = {
    "struct wd_comp_req": 72, "struct wd_comp_req.src_len": 8, "struct wd_comp_req.dst": 16,
    "struct wd_comp_req.dst_len": 24, "struct wd_comp_req.cb": 32,
    "struct wd_comp_req.op_type": 48, "struct wd_comp_req.data_fmt": 52,
    "struct wd_comp_req.status": 60, "struct wd_comp_req.priv": 64,
    "struct wd_comp_sess_setup": 88, "struct wd_comp_sess_setup.op_type": 12,
    "struct wd_comp_sess_setup.sched_param": 16, "struct wd_comp_sess_setup.mm_ops": 24,
    "struct wd_comp_sess_setup.mm_type": 80, "struct wd_mm_ops": 56,
    "struct sched_params": 20, "struct sched_params.type": 4, "struct sched_params.end": 12,
    "struct sched_params.dev_id": 16,
}


def test_declarations_match_an_installed_header():
    """Where a uadk header exists, probe it (skips here and in CI: Debian 12 and 13 do not
    package it; the layout above was checked once against the upstream header, see ``_ffi``)."""
    check_optional_header(_ffi.ffi, "MULTIFD_UADK_HEADER", "/usr/include/uadk/wd_comp.h", "uadk")


@pytest.mark.skipif(sys.maxsize <= 2**32 or sys.platform != "linux", reason="LP64 layout")
def test_declarations_match_the_header_layout():
    ffi = _ffi.ffi
    for key, expected in LAYOUT.items():
        got = ffi.offsetof(*key.split(".", 1)) if "." in key.replace("struct ", "") else \
            ffi.sizeof(key)
        assert got == expected, key
    assert _ffi.SCHED_PARAMS_ROOM >= ffi.sizeof("struct sched_params")
    for fn in _ffi.SPEC.symbols:
        assert f" {fn}(" in _ffi.CDEF


def test_loopback_migration_software():
    loopback = pytest.importorskip("multifd_core.loopback")
    from multifd_core.engine.ram import RamBlock

    block = RamBlock.zeros("pc.ram", 300 * PAGE)
    block.array[:] = image(300, 10).reshape(-1)
    dest, stats = loopback.migrate([block], method="uadk", channels=2, engine="software")
    assert np.array_equal(dest[0].array, block.array)


