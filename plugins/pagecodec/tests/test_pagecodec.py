"""multifd-pagecodec, the C helper of the qpl and uadk software engines, called directly.

The engines' tests (test_qpl.py, test_uadk.py) compare it with the Python per-page loop byte
for byte; here: its own bounds, argument checks, and the switch to the Python loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from multifd_core.testing import in_ci, make_pages, require

if not in_ci():  # in CI a missing package fails the import below
    pytest.importorskip("multifd_pagecodec", reason="pip install -e plugins/pagecodec")
import multifd_pagecodec as pagecodec  # noqa: E402

PAGE = 4096


@pytest.fixture
def native() -> None:
    require(pagecodec.AVAILABLE, f"the C helper is not available: {pagecodec.REASON}")


def lengths_of(payload: bytes | memoryview, n: int) -> list[int]:
    return np.frombuffer(payload[:4 * n], dtype=">u4").tolist()


def test_built_with_zlib_and_isal(native):
    require("isal" in pagecodec.backends(), f"built without ISA-L: {pagecodec.INSTALL}")
    assert pagecodec.backends() == ("zlib", "isal")
    assert pagecodec.library_version("zlib") == zlib.ZLIB_RUNTIME_VERSION
    assert pagecodec.library_version("isal").startswith("2.")
    assert pagecodec.why_not("zlib") is None and "native" in pagecodec.report("isal")


def test_statuses_match_the_header(native):
    lib = pagecodec._lib
    for name in ("OK", "BAD_LENGTH", "SHORT_BLOB", "CORRUPT", "LENGTH", "UNFINISHED", "NOMEM",
                 "BAD_ARGS", "NO_BACKEND"):
        assert getattr(pagecodec, name) == getattr(lib, f"PC_{name}"), name
    assert pagecodec.BACKEND_CODES == {"zlib": lib.PC_ZLIB, "isal": lib.PC_ISAL}


@pytest.mark.parametrize("backend", ["zlib", "isal"])
def test_compress_layout_and_raw_escape(native, backend):
    require(pagecodec.supports(backend), str(pagecodec.why_not(backend)))
    rng = np.random.default_rng(1)
    pages = np.concatenate([make_pages("text", 3, PAGE, rng), make_pages("random", 2, PAGE, rng),
                            np.zeros((1, PAGE), np.uint8)])
    out = bytearray(len(pages) * (4 + PAGE))
    size = pagecodec.compress(backend, -12, pages, len(pages), PAGE, out)
    lens = lengths_of(out, len(pages))
    assert size == 4 * len(pages) + sum(lens)
    pos = 4 * len(pages)
    for i, n in enumerate(lens):
        blob = bytes(out[pos:pos + n])
        if i in (3, 4):  # random pages do not shrink
            assert n == PAGE and blob == pages[i].tobytes()
        else:
            assert n < PAGE and zlib.decompressobj(-12).decompress(blob) == pages[i].tobytes()
        pos += n


def test_argument_checks(native):
    pages = np.zeros((2, PAGE), np.uint8)
    with pytest.raises(ValueError, match="status"):
        pagecodec.compress("zlib", -12, pages, 2, PAGE, bytearray(2 * (4 + PAGE) - 1))
    with pytest.raises(ValueError, match="bytes of pages"):
        pagecodec.compress("zlib", -12, pages[:1], 2, PAGE, bytearray(2 * (4 + PAGE)))
    with pytest.raises(ValueError, match="status"):
        pagecodec.compress("zlib", 99, pages, 2, PAGE, bytearray(2 * (4 + PAGE)))
    if pagecodec.supports("isal"):  # ISA-L writes raw DEFLATE only
        with pytest.raises(ValueError, match="status"):
            pagecodec.compress("isal", 15, pages, 2, PAGE, bytearray(2 * (4 + PAGE)))
    with pytest.raises(ValueError, match="output of"):
        pagecodec.decompress_into("zlib", 0, 1, bytes(8), 2, PAGE, bytearray(PAGE))


def payload_of(blobs: list[bytes], lens: list[int] | None = None) -> bytes:
    lens = [len(b) for b in blobs] if lens is None else lens
    return np.asarray(lens, dtype=">u4").tobytes() + b"".join(blobs)


def test_decoder_checks_lengths_itself(native):
    """The callers validate the length array first; the C decoder still never reads past the
    payload on a lying array."""
    blob = zlib.compress(bytes(PAGE), 1, -12)
    out = bytearray(2 * PAGE)
    for lens, page in (([len(blob), 0], 1), ([len(blob) + 1, 1], 0), ([PAGE + 1, 1], 0)):
        failure = pagecodec.decompress_into("zlib", 0, 1, payload_of([blob], lens), 2, PAGE, out)
        assert failure is not None and failure.status == pagecodec.BAD_LENGTH
        assert failure.page == page


@pytest.mark.parametrize("backend", ["zlib", "isal"])
def test_decoder_never_writes_past_a_page_slot(native, backend):
    require(pagecodec.supports(backend), str(pagecodec.why_not(backend)))
    bomb = zlib.compress(bytes(PAGE * 4), 9, -15)
    raw = bytes(range(256)) * (PAGE // 256)
    buf = bytearray(b"\xee" * (4 * PAGE))
    out = memoryview(buf)[PAGE:3 * PAGE]  # guard pages on both sides
    failure = pagecodec.decompress_into(backend, 0, 1, payload_of([raw, bomb]), 2, PAGE, out)
    assert failure is not None and (failure.page, failure.status, failure.got) == \
        (1, pagecodec.LENGTH, PAGE + 1)
    assert buf[:PAGE] == b"\xee" * PAGE and buf[3 * PAGE:] == b"\xee" * PAGE
    assert buf[PAGE:2 * PAGE] == raw


def test_skip_and_min_len(native):
    page = make_pages("text", 1, PAGE, np.random.default_rng(2))[0].tobytes()
    wrapped = zlib.compress(page, 1)
    out = bytearray(PAGE)
    assert pagecodec.decompress_into("zlib", 2, 3, payload_of([wrapped]), 1, PAGE, out) is None
    assert out == page
    failure = pagecodec.decompress_into("zlib", 2, 3, payload_of([wrapped[:2]]), 1, PAGE, out)
    assert failure is not None and (failure.status, failure.got) == (pagecodec.SHORT_BLOB, 2)


def test_packet_codec_reuses_its_buffer_safely(native):
    codec = pagecodec.PacketCodec("zlib", PAGE, wbits=-12)
    small = make_pages("text", 2, PAGE, np.random.default_rng(3))
    first = codec.compress(small, 2)
    kept = bytes(first)
    big = make_pages("text", 8, PAGE, np.random.default_rng(4))
    second = codec.compress(big, 8)  # grows: a new buffer, the old view stays readable
    assert bytes(first) == kept and len(lengths_of(second, 8)) == 8
    with pytest.raises(ValueError, match="no nothing backend"):
        pagecodec.PacketCodec("nothing", PAGE, wbits=-12)


def test_disabled_by_environment_and_the_plugins_fall_back():
    """``MULTIFD_PAGECODEC=off``: the helper reports why, and qpl and uadk run their Python
    per-page loop and still round-trip."""
    code = """
import numpy as np
import multifd_pagecodec as pc
from multifd_core.engine.harness import MethodHarness
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import mixed_pages
from multifd_qpl.method import Qpl
from multifd_uadk.method import Uadk
assert not pc.AVAILABLE and "MULTIFD_PAGECODEC=off" in pc.REASON, pc.REASON
pages = mixed_pages(64, 4096, np.random.default_rng(5))
for cls, extra in ((Qpl, {}), (Uadk, {"software_compress": True})):
    sw = {e.name: e for e in cls.engines()}["software"]
    assert "Python per page" in sw.library_version and "Python per-page loop" in sw.reason
    with MethodHarness(cls(MethodOptions(engine="software", extra=extra))) as h:
        assert np.array_equal(h.roundtrip(pages), pages)
print("ok")
"""
    env = {**os.environ, pagecodec.ENV: "off"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
