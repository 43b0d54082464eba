"""The uadk method plugin (multifd-uadk): QEMU's per-page container with zlib-wrapped blobs.

No UADK library or HiSilicon device exists here (Debian packages neither). Tested: the
software engine (raw sender as QEMU without hardware; zlib decoding of what UADK hardware
sends), the opt-in software compression (per packet through the C helper multifd-pagecodec, or
per page in Python: both paths byte for byte against each other), the declarations' layout and
every library-missing path. The UADK session code is untested.
"""

from __future__ import annotations

import zlib

import hwkit
import numpy as np
import pytest
from hwkit import LP64, PAGE, HardwareEngineChecks, image, payload_of
from pluginkit import import_plugin

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MethodError
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import MethodConformance, make_pages, mixed_pages, require

pagecodec, _ffi, engines, Uadk = import_plugin(
    "uadk", "multifd_pagecodec", "multifd_uadk._ffi", "multifd_uadk.engines",
    "multifd_uadk.method:Uadk")


def method(engine: str | None = None, compress: bool = False, native: bool = True) -> Uadk:
    return Uadk(MethodOptions(page_size=PAGE, engine=engine,
                              extra={"software_compress": compress, "native": native}))


def need_native() -> None:
    require(pagecodec.why_not("zlib") is None,
            f"the uadk software engine runs its Python per-page loop: {pagecodec.why_not('zlib')}")


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
    hwkit.assert_native_helper_reported(Uadk)
    made = engines.create("software", PAGE, 0, 128, compress=True, software_compress=True)
    assert made.native is not None
    assert engines.create("software", PAGE, 0, 128, compress=True, native=False).native is None


@pytest.mark.parametrize("compress", [True, False])
def test_native_payload_is_byte_identical_to_the_python_loop(compress):
    need_native()
    rng = np.random.default_rng(7)
    pages = np.concatenate([mixed_pages(200, PAGE, rng), make_pages("random", 10, PAGE, rng)])
    pages = pages[rng.permutation(len(pages))]
    hwkit.assert_paths_agree(method(compress=compress), method(compress=compress, native=False),
                       pages, (0, 128, 210 - 5), (compress,))


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
    hwkit.refusals_alike(lambda native: method(native=native),
                   [(name, payload_of(blobs), len(blobs)) for name, blobs in cases.items()])


# ---------------------------------------------------------------- bad input

def rejected(payload: bytes, n: int, match: str) -> MethodError:
    return hwkit.refused(method(), payload, n, match)


def test_length_array_checks():
    pages = make_pages("text", 4, PAGE, np.random.default_rng(5))
    hwkit.assert_length_array_checked(rejected, hardware_like(pages), 4)


def test_corrupt_short_and_bomb_blobs():
    text = make_pages("text", 1, PAGE, np.random.default_rng(6))[0].tobytes()
    blob = bytearray(zlib.compress(text, 1))
    blob[10] ^= 0xFF
    rejected(payload_of([bytes(blob)]), 1, "failed decompression|decompressed length")
    rejected(payload_of([zlib.compress(text[:100], 1)]), 1, "decompressed length error")
    rejected(payload_of([b"\x78"]), 1, "too short")
    bomb = zlib.compress(bytes(3 << 20), 9)
    hwkit.assert_bomb_bounded(rejected, bomb, "decompressed length error")


# ---------------------------------------------------------------- engine choice, library

class TestUadkEngines(HardwareEngineChecks):
    """The UADK engine and the software one; libwd_comp missing or wrong."""

    method_cls, hardware, ffi, engines = Uadk, "uadk", _ffi, engines
    library = ("libwd_comp.so.2", "MULTIFD_UADK_LIBRARY", "Linaro/uadk")
    foreign_symbol = "wd_comp_init2_"
    header = ("MULTIFD_UADK_HEADER", "/usr/include/uadk/wd_comp.h")


# ---------------------------------------------------------------- the binding's ABI

# Layout of Linaro/uadk wd_comp.h / wd_sched.h / wd.h structs on LP64 (gcc 12), probed with
# multifd_core.layout against Linaro/uadk 97d643e. The session setup and sched_params are the
# newest forms (mm_ops, mm_type; dev_id); older UADK reads only their first 24 / 16 bytes.
LAYOUT = {
    "struct wd_comp_req": (72, {"src_len": 8, "dst": 16, "dst_len": 24, "cb": 32, "op_type": 48,
                                "data_fmt": 52, "status": 60, "priv": 64}),
    "struct wd_comp_sess_setup": (88, {"op_type": 12, "sched_param": 16, "mm_ops": 24,
                                       "mm_type": 80}),
    "struct wd_mm_ops": (56, {}),
    "struct sched_params": (20, {"type": 4, "end": 12, "dev_id": 16}),
}


@LP64
def test_declarations_match_the_header_layout():
    ffi = _ffi.ffi
    hwkit.assert_layout(ffi, LAYOUT)
    assert _ffi.SCHED_PARAMS_ROOM >= ffi.sizeof("struct sched_params")
    for fn in _ffi.SPEC.symbols:
        assert f" {fn}(" in _ffi.CDEF


def test_loopback_migration_software():
    hwkit.assert_loopback_migration("uadk", seed=10)


