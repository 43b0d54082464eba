"""Checks shared by the hardware-backed method plugins (qpl, uadk, qatzip): a software engine
chosen when the device or library is missing, the library-missing paths, the cffi layout, the
per-page container of qpl and uadk (a big-endian length array, then the blobs), and the C
helper checked against the Python per-page loop.

Nothing here imports a plugin: the test module passes its method class, its ``_ffi`` and
``engines`` modules, or a factory of its methods.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from layoutkit import check_optional_header

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import LibraryNotFoundError, MethodError, MultiFDError
from multifd_core.methods.method import EngineInfo, Method, MethodOptions
from multifd_core.testing import mixed_pages, system_zlib

PAGE = 4096

LP64 = pytest.mark.skipif(sys.maxsize <= 2**32 or sys.platform != "linux",
                          reason="LP64 Linux layout")

Refuse = Callable[[bytes, int, str], MethodError]


def image(n: int, seed: int = 1) -> np.ndarray:
    return mixed_pages(n, PAGE, np.random.default_rng(seed))


def engine_info(cls: type[Method]) -> dict[str, EngineInfo]:
    return {e.name: e for e in cls.engines()}


# ---------------------------------------------------------------- the per-page container

def split(payload: bytes, n: int) -> list[bytes]:
    """The ``n`` blobs of a per-page payload; its length array must add up to it exactly."""
    lens = np.frombuffer(payload[:4 * n], dtype=">u4").tolist()
    out, pos = [], 4 * n
    for ln in lens:
        out.append(payload[pos:pos + ln])
        pos += ln
    assert pos == len(payload)
    return out


def payload_of(blobs: list[bytes], lens: list[int] | None = None) -> bytes:
    lens = [len(b) for b in blobs] if lens is None else lens
    return np.asarray(lens, dtype=">u4").tobytes() + b"".join(blobs)


def refused(method: Method, payload: bytes, n: int, match: str) -> MethodError:
    """The error decoding ``payload`` as ``n`` pages with ``method`` must raise."""
    with MethodHarness(method) as h, pytest.raises(MethodError, match=match) as e:
        h.decode(payload, n)
    return e.value


def assert_length_array_checked(refuse: Refuse, good: bytes, n: int) -> list[bytes]:
    """A short array, a blob longer than a page, an empty blob, and lengths that do not add up
    (one short, one over) in the ``n``-page payload ``good``: each refused, naming its field.
    Returns the blobs of ``good``."""
    blobs = split(good, n)
    lens = [len(b) for b in blobs]
    e = refuse(good[:4 * n], n, "cannot hold the length array")
    assert e.field == "next_packet_size" and e.received == 4 * n
    e = refuse(payload_of(blobs, [PAGE + 1] + lens[1:]), n, "blob length 4097")
    assert (e.field, e.received) == ("len[0]", PAGE + 1)
    e = refuse(payload_of(blobs, lens[:-1] + [0]), n, "blob length 0")
    assert e.field == f"len[{n - 1}]"
    e = refuse(payload_of(blobs, lens[:-1] + [lens[-1] - 1]), n, "add up")
    assert e.expected == len(good) - 1
    refuse(payload_of(blobs, lens[:-1] + [lens[-1] + 1]), n, "add up")
    return blobs


def assert_bomb_bounded(refuse: Refuse, bomb: bytes, match: str) -> None:
    """A one-page blob that inflates to megabytes stops one byte past the page."""
    assert len(bomb) < PAGE
    e = refuse(payload_of([bomb]), 1, match)
    assert e.received == PAGE + 1  # stopped one byte past the page, never further


# ---------------------------------------------------------------- the C helper

def assert_native_helper_reported(cls: type[Method]) -> None:
    sw = engine_info(cls)["software"]
    assert "native per packet" in sw.library_version and "native per-packet helper" in sw.reason


def assert_paths_agree(native: Method, python: Method, pages: np.ndarray, starts: Iterable[int],
                       label: tuple[Any, ...], identical: bool = True) -> None:
    """Packets of up to 128 ``pages`` from each of ``starts``: the C helper's payload decodes on
    both paths, and is ``identical`` to the Python loop's (else within 0.1% of its size, and
    the helper decodes the loop's payload)."""
    with MethodHarness(native) as a, MethodHarness(python) as b:
        for start in starts:
            chunk = pages[start:start + 128]
            payload, reference = bytes(a.encode(chunk)), bytes(b.encode(chunk))
            if identical:
                assert payload == reference, (*label, start)
            else:
                assert abs(len(payload) - len(reference)) <= len(reference) // 1000
                assert np.array_equal(a.decode(reference, len(chunk)), chunk)
            assert np.array_equal(b.decode(payload, len(chunk)), chunk)
            assert np.array_equal(a.decode(payload, len(chunk)), chunk)


def refusals_alike(make: Callable[[bool], Method], cases: Iterable[tuple[str, bytes, int]],
                   label: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Each (name, payload, pages) decoded by ``make(native=True)`` and ``make(False)``: the
    same pages, or the same error (message, field, received, expected). Returns the outcomes by
    name: the pages' bytes, or that error tuple."""
    found = {}
    for name, payload, n in cases:
        outcomes = []
        for native in (True, False):
            with MethodHarness(make(native)) as h:
                try:
                    outcomes.append(h.decode(payload, n).tobytes())
                except MethodError as e:
                    outcomes.append((str(e), e.field, e.received, e.expected))
        assert outcomes[0] == outcomes[1], (*label, name)
        found[name] = outcomes[0]
    return found


# ---------------------------------------------------------------- engine choice, library

def assert_engine_refused(make: Callable[..., Method], engine: str) -> None:
    with pytest.raises(MultiFDError, match="not available"):
        make(engine)


def assert_forced_software(monkeypatch: pytest.MonkeyPatch, engines: Any, cls: type[Method],
                           make: Callable[..., Method], *down: str) -> dict[str, EngineInfo]:
    """``engines.ENV_ENGINE=software``: the default engine is software, each of ``down`` is
    unavailable saying it was forced. Returns the engines' info."""
    monkeypatch.setenv(engines.ENV_ENGINE, "software")
    info = engine_info(cls)
    for name in down:
        assert not info[name].available and "forced" in info[name].reason
    assert make().engine == "software"
    return info


def assert_library_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ffi: Any,
                           soname: str, *named: str) -> Path:
    """``ffi.SPEC.env`` naming a missing ``soname``: loading fails naming that path and each of
    ``named``. Returns the path."""
    missing = tmp_path / soname
    monkeypatch.setenv(ffi.SPEC.env, str(missing))
    with pytest.raises(LibraryNotFoundError) as err:
        ffi.load()
    text = str(err.value)
    for part in (str(missing), *named):
        assert part in text, part
    return missing


def assert_engine_down(cls: type[Method], engine: str, reason: str) -> None:
    info = engine_info(cls)
    assert not info[engine].available and reason in info[engine].reason


def assert_other_library_refused(monkeypatch: pytest.MonkeyPatch, ffi: Any, symbol: str) -> None:
    """``ffi.SPEC.env`` naming the system's libz: refused for its first missing symbol."""
    monkeypatch.setenv(ffi.SPEC.env, system_zlib())
    with pytest.raises(LibraryNotFoundError, match=f"no symbol {symbol}"):
        ffi.load()


class HardwareEngineChecks:
    """Inherit in a ``Test*`` class of a plugin with one hardware engine beside its software
    one (qpl, uadk); pytest runs the checks below. Set:

    ``method_cls``      the method class
    ``hardware``        the hardware engine's name
    ``ffi``, ``engines``  the plugin's ``_ffi`` module (``SPEC``, ``load``, ``ffi``) and its
                        ``engines`` module (``ENV_ENGINE``)
    ``library``         the library's file name, then what the error for a missing one names
    ``foreign_symbol``  the first of the library's symbols the system's libz lacks
    ``header``          (environment variable, default path) of the vendor's header
    """

    method_cls: ClassVar[type[Method]]
    hardware: ClassVar[str]
    ffi: ClassVar[Any]
    engines: ClassVar[Any]
    library: ClassVar[tuple[str, ...]]
    foreign_symbol: ClassVar[str]
    header: ClassVar[tuple[str, str]]

    def method(self, engine: str | None = None) -> Method:
        return self.method_cls(MethodOptions(page_size=PAGE, engine=engine))

    def test_hardware_unavailable_here_and_software_chosen(self) -> None:
        """The engines are the hardware one and software; without the hardware (as here) it
        says why, the default is software, and asking for the hardware is refused."""
        info = engine_info(self.method_cls)
        hw = self.hardware
        assert set(info) == {hw, "software"} and info[hw].kind == "hardware"
        if not info[hw].available:
            assert info[hw].reason
            assert self.method().engine == "software"
            assert_engine_refused(self.method, hw)

    def test_forced_software(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert_forced_software(monkeypatch, self.engines, self.method_cls, self.method,
                               self.hardware)

    def test_library_missing(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        assert_library_missing(monkeypatch, tmp_path, self.ffi, *self.library)
        assert_engine_down(self.method_cls, self.hardware, "no library")
        assert_engine_refused(self.method, self.hardware)

    def test_library_that_is_not_the_vendors(self, monkeypatch: pytest.MonkeyPatch) -> None:
        assert_other_library_refused(monkeypatch, self.ffi, self.foreign_symbol)
        assert self.method().engine == "software"

    def test_declarations_match_an_installed_header(self) -> None:
        """Where the vendor's header exists, probe it (skips here and in CI: Debian 12 and 13
        do not package it; the layout in the test module was checked once against the upstream
        header, see the plugin's ``_ffi``)."""
        check_optional_header(self.ffi.ffi, *self.header, self.method_cls.name)


# ---------------------------------------------------------------- the binding's ABI

def assert_layout(ffi: Any, layout: dict[str, tuple[int, dict[str, int]]]) -> None:
    """``{struct: (sizeof, {field: offsetof})}``: how cffi lays out the declarations."""
    for struct_name, (size, fields) in layout.items():
        assert ffi.sizeof(struct_name) == size, struct_name
        for field, offset in fields.items():
            assert ffi.offsetof(struct_name, field) == offset, f"{struct_name}.{field}"


# ---------------------------------------------------------------- end to end

def assert_loopback_migration(method: str, seed: int, engine: str = "software",
                             **options: Any) -> Any:
    """300 pages over loopback TCP on two channels with ``engine``; returns the stats."""
    from multifd_core import loopback
    from multifd_core.engine.ram import RamBlock

    block = RamBlock.zeros("pc.ram", 300 * PAGE)
    block.array[:] = image(300, seed).reshape(-1)
    dest, stats = loopback.migrate([block], method=method, channels=2, engine=engine, **options)
    assert np.array_equal(dest[0].array, block.array)
    return stats
