"""The qatzip method plugin (multifd-qatzip): real libqatzip and the pure-software engine.

libqatzip: ``$MULTIFD_QATZIP_LIBRARY`` when set, else this checkout's ``.cache/qatzip`` (made
by ``scripts/setup-system.sh``), else the system's. Tests that need it skip locally and fail
in CI when it is missing. There is no QAT device here: libqatzip runs its software backup,
which is also what QEMU does without one.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hwkit import (
    LP64,
    PAGE,
    assert_engine_down,
    assert_engine_refused,
    assert_forced_software,
    assert_layout,
    assert_library_missing,
    assert_loopback_migration,
    assert_other_library_refused,
    engine_info,
    image,
)
from pluginkit import import_plugin

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import LibraryNotFoundError, MethodError, MultiFDError
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import (
    MethodConformance,
    assert_struct_layout,
    check_struct_layout,
    make_pages,
    require,
)

_native, _ffi, engines, gzipqz, Qatzip = import_plugin(
    "qatzip", "multifd_core.methods.native", "multifd_qatzip._ffi", "multifd_qatzip.engines",
    "multifd_qatzip.gzipqz", "multifd_qatzip.method:Qatzip")

REPO = Path(__file__).resolve().parents[3]
CACHE_LIBS = sorted(glob.glob(str(REPO / ".cache/qatzip/usr/lib/*/libqatzip.so.3")))
CACHE_HEADER = REPO / ".cache/qatzip/usr/include/qatzip.h"


@pytest.fixture(autouse=True, scope="module")
def qatzip_library():
    """Point the plugin at this checkout's unpacked libqatzip unless the user chose one."""
    mp = pytest.MonkeyPatch()
    if not os.environ.get(_ffi.SPEC.env) and CACHE_LIBS:
        mp.setenv(_ffi.SPEC.env, CACHE_LIBS[0])
    mp.delenv(engines.ENV_ENGINE, raising=False)
    yield
    mp.undo()


def library_loads() -> bool:
    try:
        _ffi.load()
    except LibraryNotFoundError:
        return False
    return True


def need_library() -> None:
    require(library_loads(), "libqatzip is not available: run scripts/setup-system.sh as root "
            "(unpacks Debian 13's libqatzip3 into .cache/qatzip) or set MULTIFD_QATZIP_LIBRARY")


def method(engine: str | None = None, level: int | None = None) -> Qatzip:
    return Qatzip(MethodOptions(page_size=PAGE, engine=engine, level=level))


def members(payload: bytes) -> list[tuple[bytes, int, int, int]]:
    """(header, src_sz, dest_sz, xfl) of each QZ-extended member, walking by dest_sz."""
    out, pos = [], 0
    while pos < len(payload):
        head = payload[pos:pos + 24]
        magic, _, xfl, os_, xlen, q, z, sub, src, dest = struct.unpack("<4sIBBHBBHII", head)
        assert (magic, os_, xlen, q, z, sub) == (b"\x1f\x8b\x08\x04", 0xFF, 12, 81, 90, 8)
        crc, isize = struct.unpack_from("<II", payload, pos + 24 + dest)
        assert isize == src
        out.append((head, src, dest, xfl))
        pos += 24 + dest + 8
    assert pos == len(payload)
    return out


class TestQatzipConformance(MethodConformance):
    """Every engine available here (libqatzip and software), and each against the other."""

    method_cls = Qatzip
    stateful = False


# ---------------------------------------------------------------- the real library

def test_libqatzip_loads_without_ld_library_path():
    """The plugin opens libqatzip from its folder by itself (dependencies preloaded)."""
    need_library()
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env[_ffi.SPEC.env] = os.environ[_ffi.SPEC.env] if os.environ.get(_ffi.SPEC.env) else ""
    code = ("from multifd_qatzip import _ffi; o = _ffi.load(); "
            "print(o.path); print(o.version)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert os.path.basename(out[0]).startswith("libqatzip.so.3")
    assert out[1][0].isdigit()


def test_libqatzip_works_without_a_device_as_in_qemu():
    """qzInit(sw_backup=1) and the deflate session succeed with no QAT device; that engine is
    reported as software-kind with the reason, and runs on request only (the default is ours:
    libqatzip without a device prints a line on every call)."""
    need_library()
    lib = engine_info(Qatzip)["libqatzip"]
    assert lib.available and lib.library and lib.library_version and lib.path == "native"
    if engines.devices():
        assert method().engine == "libqatzip"
    else:
        assert lib.kind == "software" and "no QAT device" in lib.reason
        assert "--engine libqatzip" in lib.reason
        assert method().engine == "software"
    with MethodHarness(method("libqatzip")) as h:
        pages = image(128)
        assert np.array_equal(h.roundtrip(pages), pages)


def test_libqatzip_is_the_default_when_asked_for(monkeypatch):
    need_library()
    monkeypatch.setenv(engines.ENV_ENGINE, "libqatzip")
    assert [e.name for e in Qatzip.engines()] == ["libqatzip", "software"]
    assert method().engine == "libqatzip"


def test_engine_switch_values_are_checked(monkeypatch):
    monkeypatch.setenv(engines.ENV_ENGINE, "libqatzp")
    with pytest.raises(MultiFDError, match="MULTIFD_QATZIP_ENGINE='libqatzp' is not a valid "
                                           "value: use auto or software or libqatzip"):
        Qatzip.engines()


def test_qat_devices_found_by_node_or_vfio_binding(tmp_path):
    """/dev/qat_* nodes, and QAT virtual functions bound to vfio-pci (not other drivers,
    not other Intel devices) count as devices."""
    from multifd_qatzip.device import qat_devices

    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    drivers = sys_root / "bus/pci/drivers"
    for drv in ("vfio-pci", "4xxx"):
        (drivers / drv).mkdir(parents=True)

    def pci(addr: str, vendor: str, device: str, driver: str | None) -> None:
        d = sys_root / "bus/pci/devices" / addr
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        if driver:
            (d / "driver").symlink_to(drivers / driver)

    dev_root.mkdir()
    pci("0000:00:02.0", "0x8086", "0x4941", "4xxx")  # a QAT VF on its kernel driver
    pci("0000:00:03.0", "0x8086", "0x1572", "vfio-pci")  # another Intel device on vfio
    pci("0000:00:04.0", "0x8086", "0x4941", None)  # unbound
    assert qat_devices(str(sys_root), str(dev_root)) == []
    pci("0000:6b:00.1", "0x8086", "0x4941", "vfio-pci")
    (dev_root / "qat_adf_ctl").touch()
    assert qat_devices(str(sys_root), str(dev_root)) == [
        str(dev_root / "qat_adf_ctl"), "0000:6b:00.1 (vfio-pci)"]


NOISE_SCRIPT = """
import os, sys
from multifd_core.engine.harness import MethodHarness
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import mixed_pages
from multifd_qatzip.method import Qatzip
import numpy as np
pages = mixed_pages(64, 4096, np.random.default_rng(1))
with MethodHarness(Qatzip(MethodOptions(engine=sys.argv[1] or None))) as h:
    for _ in range(3):
        assert np.array_equal(h.roundtrip(pages), pages)
os.write(2, b"ours: native write\\n")
print("ours: python write", file=sys.stderr)
"""


@pytest.mark.parametrize("engine", ["libqatzip", None])
def test_no_library_noise_on_stderr(engine):
    """libqatzip without a device prints "Cannot open /dev/vfio" on every compress and
    decompress call; the default engine then is ours, and libqatzip on request has that line
    filtered out: stderr carries exactly what the program itself wrote, in order."""
    need_library()
    env = {**os.environ}
    env.pop(engines.ENV_ENGINE, None)
    proc = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, engine or ""],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "ours: native write\nours: python write\n"


@pytest.mark.parametrize(("sender", "receiver"), [("libqatzip", "software"),
                                                  ("software", "libqatzip"),
                                                  ("libqatzip", "libqatzip"),
                                                  ("software", "software")])
def test_cross_engine_full_and_partial_packets(sender, receiver):
    if "libqatzip" in (sender, receiver):
        need_library()
    with MethodHarness(method(sender, level=1), method(receiver)) as h:
        for n, seed in [(128, 1), (1, 2), (17, 3), (127, 4)]:
            pages = image(n, seed)
            assert np.array_equal(h.roundtrip(pages), pages), f"{n} pages"


def test_libqatzip_software_backup_writes_one_qz_member():
    """Without a device QATzip writes one QZ-extended member for the whole packet."""
    need_library()
    with MethodHarness(method("libqatzip")) as h:
        payload = h.encode(image(128))
    found = members(payload)
    assert len(found) == 1 and found[0][1] == 128 * PAGE


@pytest.mark.parametrize("level", [1, 5, 9])
def test_every_level_both_engines(level):
    engines_here = ["software"] + (["libqatzip"] if library_loads() else [])
    pages = make_pages("text", 64, PAGE, np.random.default_rng(5))
    for a in engines_here:
        for b in engines_here:
            with MethodHarness(method(a, level=level), method(b)) as h:
                assert np.array_equal(h.roundtrip(pages), pages), (a, b, level)


# ---------------------------------------------------------------- the software format

def test_software_writes_one_qz_member_per_64k_chunk():
    with MethodHarness(method("software")) as h:
        payload = h.encode(image(128))
        part = h.encode(image(20, 7))
    found = members(payload)
    assert [m[1] for m in found] == [65536] * 8
    assert [m[1] for m in members(part)] == [65536, 20 * PAGE - 65536]
    assert all(m[3] == 4 for m in found)  # XFL: fastest, at level 1
    assert gzip.decompress(payload) == image(128).tobytes()  # any gzip reader


def test_level_nine_is_not_larger_than_level_one():
    pages = make_pages("text", 128, PAGE, np.random.default_rng(9))
    sizes = []
    for level in (1, 9):
        with MethodHarness(method("software", level=level)) as h:
            sizes.append(len(h.encode(pages)))
    assert sizes[1] <= sizes[0]


def test_plain_gzip_members_decode_on_every_engine():
    """Standard gzip members (FNAME, several members, no QZ field) are accepted too."""
    pages = image(32, 11)
    data = pages.tobytes()
    named = gzip.compress(data[:50000], mtime=0)
    payload = named + gzip.compress(data[50000:], 6)
    for engine in ["software"] + (["libqatzip"] if library_loads() else []):
        with MethodHarness(method(engine)) as h:
            assert np.array_equal(h.decode(payload, 32), pages), engine


def test_incompressible_packet_round_trips():
    pages = make_pages("random", 128, PAGE, np.random.default_rng(12))
    with MethodHarness(method("software")) as h:
        payload = h.encode(pages)
        assert len(payload) > pages.nbytes  # no raw escape in this format
        assert len(payload) <= h.recv_method.max_payload(128)
        assert np.array_equal(h.decode(payload, 128), pages)


# ---------------------------------------------------------------- bad payloads

@pytest.mark.parametrize("engine", ["software", "libqatzip"])
def test_corrupt_members_are_refused(engine):
    if engine == "libqatzip":
        need_library()
    pages = image(16, 13)
    with MethodHarness(method("software")) as h:
        good = bytearray(h.encode(pages))
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0xFF  # CRC-32 of the last member
    bad_size = bytearray(good)
    bad_size[-4] ^= 0x01  # its ISIZE
    cases = {"crc": bytes(bad_crc), "isize": bytes(bad_size),
             "truncated": bytes(good[:len(good) // 2]),
             "garbage": b"\x1f\x8b" + bytes(100), "empty": b""}
    for what, payload in cases.items():
        with MethodHarness(method(engine)) as h, pytest.raises(MethodError):
            h.decode(payload, 16)
            pytest.fail(f"{what}: decoded")
    # Cut inside the last trailer: libqatzip (like QEMU with it) still yields the exact pages;
    # our software engine refuses. Either is safe: never wrong pages.
    with MethodHarness(method(engine)) as h:
        try:
            out = h.decode(bytes(good[:-3]), 16)
        except MethodError:
            assert engine == "software"
        else:
            assert np.array_equal(out, pages)


@pytest.mark.parametrize("engine", ["software", "libqatzip"])
def test_bomb_is_bounded(engine):
    """A small payload that inflates to 64 MiB: an error, with output never past the packet."""
    if engine == "libqatzip":
        need_library()
    bomb = gzip.compress(bytes(64 << 20), 9)
    assert len(bomb) < 100_000
    pages = image(128, 16)
    with MethodHarness(method(engine)) as h:
        with pytest.raises(MethodError):
            h.decode(bomb, 128)
        # the channel's decoder still works afterwards (libqatzip's session is reset)
        assert np.array_equal(h.roundtrip(pages), pages)


def test_decode_never_writes_past_its_buffer():
    out = bytearray(PAGE * 2 + 5)
    payload = gzip.compress(bytes(PAGE * 3))
    with pytest.raises(MethodError, match="more than"):
        gzipqz.decode_into(memoryview(payload), memoryview(out)[:PAGE * 2], 0)
    assert out[PAGE * 2:] == bytes(5)


def test_many_tiny_members_stay_cheap():
    """10 000 empty members then the data: decoded, without quadratic copying."""
    data = image(2, 14).tobytes()
    payload = gzip.compress(b"") * 10_000 + gzip.compress(data)
    with MethodHarness(method("software")) as h:
        assert h.decode(payload, 2).tobytes() == data


def test_wrong_size_and_oversized_packets():
    pages = image(8, 15)
    with MethodHarness(method("software")) as h:
        payload = h.encode(pages)
        with pytest.raises(MethodError, match="packet size received 32768 size expected 36864"):
            h.decode(payload, 9)
        with pytest.raises(MethodError, match="unexpectedly large packet"):  # the wire's bound
            h.decode(bytes((1 << 20) + 1), 1)


# ---------------------------------------------------------------- engine choice

def test_forced_software_by_environment(monkeypatch):
    down = ["libqatzip"] if library_loads() else []
    info = assert_forced_software(monkeypatch, engines, Qatzip, method, *down)
    assert info["software"].available and "forced" in info["software"].reason


def test_library_missing(monkeypatch, tmp_path):
    missing = assert_library_missing(monkeypatch, tmp_path, _ffi, "libqatzip.so.3",
                                     "MULTIFD_QATZIP_LIBRARY", "apt-get install libqatzip3")
    assert_engine_down(Qatzip, "libqatzip", str(missing))
    assert method().engine == "software"
    assert_engine_refused(method, "libqatzip")


def test_library_that_is_not_qatzip(monkeypatch):
    assert_other_library_refused(monkeypatch, _ffi, "qzInit")


def test_system_search_reports_where_it_looked(monkeypatch):
    monkeypatch.delenv(_ffi.SPEC.env, raising=False)
    monkeypatch.setattr(_native.ctypes.util, "find_library", lambda name: None)
    spec = _native.LibrarySpec("libnothing", "MULTIFD_NOTHING_LIBRARY", "nothing",
                               ("libnothing.so.9",), install="Install nothing.")
    with pytest.raises(LibraryNotFoundError) as err:
        _native.open_library(spec, _ffi.ffi)
    text = str(err.value)
    for part in ("$MULTIFD_NOTHING_LIBRARY (unset)", "find_library('nothing')",
                 "libnothing.so.9", "Install nothing."):
        assert part in text


def test_cli_lists_the_engines():
    out = subprocess.run([sys.executable, "-m", "multifd_core.cli", "methods", "--json"],
                         capture_output=True, text=True, check=True, env=dict(os.environ))
    report = json.loads(out.stdout)
    qz = next(m for m in report["methods"] if m["name"] == "qatzip")
    assert qz["code"] == 0x20
    assert sorted(e["name"] for e in qz["engines"]) == ["libqatzip", "software"]
    assert qz["engines"][0]["name"] == ("libqatzip" if engines.devices() else "software")


# ---------------------------------------------------------------- the binding's ABI

# sizeof/offsetof of QATzip 1.3.1's qatzip.h structs, x86-64 LP64 (gcc 12 on that header).
HEADER_LAYOUT = {
    "QzSession_T": (40, {"internal": 16, "total_out": 32}),
    "QzSessionParamsCommon_T": (48, {"comp_lvl": 4, "sw_backup": 16, "hw_buff_sz": 20,
                                     "polling_mode": 40, "is_sensitive_mode": 44}),
    "QzSessionParamsDeflate_T": (56, {"huffman_hdr": 48, "data_fmt": 52}),
    "QzStatus_T": (544, {"memory_alloced": 8, "hw_session_status": 24, "algo_hw": 287}),
}


@LP64
def test_declarations_match_the_header_layout():
    assert_layout(_ffi.ffi, HEADER_LAYOUT)


def installed_header() -> str:
    headers = [p for p in (os.environ.get("MULTIFD_QATZIP_HEADER"), str(CACHE_HEADER),
                           "/usr/include/qatzip.h") if p and os.path.exists(p)]
    require(bool(headers), "qatzip.h not found: run scripts/setup-system.sh as root (it unpacks "
                           "libqatzip-dev), or set MULTIFD_QATZIP_HEADER")
    return headers[0]


def test_declarations_match_the_installed_header():
    """Every declared struct's sizeof/offsetof, compiled against the real qatzip.h (runs in CI:
    set-up unpacks Debian 13's libqatzip-dev)."""
    assert assert_struct_layout(_ffi.ffi, installed_header()) == 39


def test_layout_helper_names_a_wrong_declaration():
    """A cdef that drops a field of QzSession_T is caught, field by field."""
    import cffi

    wrong = cffi.FFI()
    wrong.cdef("typedef struct QzSession_S { signed long int hw_session_stat; void *internal; "
               "unsigned long total_in; unsigned long total_out; } QzSession_T;")
    found = {m.what: (m.cffi, m.header) for m in check_struct_layout(wrong, installed_header())}
    assert found == {"sizeof(QzSession_T)": (32, 40),
                     "offsetof(QzSession_T, internal)": (8, 16),
                     "offsetof(QzSession_T, total_in)": (16, 24),
                     "offsetof(QzSession_T, total_out)": (24, 32)}
    extra = cffi.FFI()
    extra.cdef("struct not_in_qatzip { int a; };")
    assert [str(m) for m in check_struct_layout(extra, installed_header())] == [
        "sizeof(struct not_in_qatzip): cffi 4, not in the header",
        "offsetof(struct not_in_qatzip, a): cffi 0, not in the header"]


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("engine", ["software", "libqatzip"])
def test_loopback_migration_per_engine(engine):
    if engine == "libqatzip":
        need_library()
    stats = assert_loopback_migration("qatzip", seed=21, engine=engine, level=3)
    assert stats.normal_pages > 0
