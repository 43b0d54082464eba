"""The native-plugin toolkit (``multifd_core.methods.native``) on a real library: libisal."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import cffi
import pytest

from multifd_core.errors import LibraryNotFoundError, MultiFDError
from multifd_core.methods import native
from multifd_core.methods.native import (
    LibrarySpec,
    hardware_engine_info,
    open_library,
    software_forced,
)
from multifd_core.testing import require

ENV = "MULTIFD_TEST_ISAL_LIBRARY"
SWITCH = "MULTIFD_IGZIP_ENGINE"


def isal_spec(**kw: object) -> LibrarySpec:
    return LibrarySpec(label="libisal", env=ENV, find_name="isal", sonames=("libisal.so.2",),
                       symbols=("isal_deflate",), **kw)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(SWITCH, raising=False)
    native.clear_cache()
    yield
    native.clear_cache()


def isal_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef("int isal_deflate(void *stream);")
    return ffi


def open_isal(**kw: object) -> native.OpenLibrary:
    try:
        return open_library(isal_spec(**kw), isal_ffi())
    except LibraryNotFoundError as exc:
        require(False, f"libisal is not installed: apt-get install libisal2 ({exc})")
        raise


def test_version_from_the_file_name_says_so():
    """libisal.so.2.0.30 is ISA-L 2.30: a file-name version is labelled as one."""
    opened = open_isal()
    assert opened.version_source == "file name"
    assert opened.version == os.path.basename(opened.path).split(".so.", 1)[1]
    assert opened.version_label == f"{opened.version} (file name)"


def test_version_asked_from_the_library():
    opened = open_isal(version=lambda lib, ffi: "2.30")
    assert (opened.version, opened.version_source, opened.version_label) == \
        ("2.30", "library", "2.30")
    info = hardware_engine_info("igzip", SWITCH, True, "", opened)
    assert info.library_version == "2.30" and info.library == opened.path


def test_a_library_without_the_version_call_falls_back_to_the_file_name():
    def missing(lib: object, ffi: object) -> str:
        raise AttributeError("no such function")

    assert open_isal(version=missing).version_source == "file name"


def test_open_library_is_hashable_and_cached_per_path():
    """The guide's "load once per path (functools.cache)" works on what open_library returns."""
    opened = open_isal()
    calls = []

    @functools.cache
    def setup(lib: native.OpenLibrary) -> str:
        calls.append(lib)
        return lib.path

    assert setup(opened) == setup(opened) == opened.path and len(calls) == 1
    assert opened in {opened} and open_isal() is opened


@pytest.mark.parametrize("install", ["apt-get install libisal2", "Install it.", ""])
def test_not_found_message_is_punctuated(monkeypatch, tmp_path, install):
    missing = tmp_path / "libisal.so.2"
    monkeypatch.setenv(ENV, str(missing))
    with pytest.raises(LibraryNotFoundError) as err:
        open_library(isal_spec(install=install), isal_ffi())
    text = str(err.value)
    assert str(missing) in text and "  " not in text and ".." not in text
    hint = install.rstrip(".") + ". " if install else ""
    assert text.endswith(f"{hint}Or set {ENV}=/path/to/libisal.so.2.")


def test_forced_engine_without_a_reason_reads_cleanly(monkeypatch):
    monkeypatch.setenv(SWITCH, "software")
    info = hardware_engine_info("igzip", SWITCH, True, "", None)
    assert not info.available and info.reason == f"forced off by {SWITCH}=software"
    info = hardware_engine_info("igzip", SWITCH, False, "no device", None)
    assert info.reason == f"forced off by {SWITCH}=software (no device)"


@pytest.mark.parametrize(("value", "forced"), [("", False), ("auto", False),
                                               ("software", True), (" Software ", True)])
def test_engine_switch_values(monkeypatch, value, forced):
    monkeypatch.setenv(SWITCH, value)
    assert software_forced(SWITCH) is forced


def test_engine_switch_typo_is_an_error_naming_the_valid_values(monkeypatch):
    monkeypatch.setenv(SWITCH, "sofware")
    with pytest.raises(MultiFDError) as err:
        software_forced(SWITCH)
    assert str(err.value) == (f"{SWITCH}='sofware' is not a valid value: use auto or "
                              f"software (or leave it unset)")


def test_engine_switch_typo_in_a_plugin_fails_multifd_methods_in_one_line():
    env = {**os.environ, "MULTIFD_QPL_ENGINE": "sofware"}
    out = subprocess.run([sys.executable, "-m", "multifd_core.cli", "methods"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == ("multifd: error: MULTIFD_QPL_ENGINE='sofware' is not a "
                                  "valid value: use auto or software (or leave it unset)")
