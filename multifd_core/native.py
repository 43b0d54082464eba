"""The native-plugin toolkit: open a vendor's shared library with cffi, report its engines.

A public, stable API for method plugins (the qpl, uadk and qatzip plugins use it; the guide,
docs/writing-a-plugin.md section 7, has a worked example):

- ``LibrarySpec`` and ``open_library(spec, ffi) -> OpenLibrary``: the lookup. Order: the file
  named by the plugin's environment variable (an error if it is set and cannot be opened: no
  silent fallback), then ``ctypes.util.find_library``, then the known sonames through the
  system loader. Opened from a path, the library's dependencies found in the same folder are
  opened first (``RTLD_GLOBAL``), so an unpacked package works without ``LD_LIBRARY_PATH``.
  Both outcomes are cached per library and setting; ``clear_cache()`` forgets them.
- ``software_forced(env)``: the ``$MULTIFD_<METHOD>_ENGINE=software`` switch (a value other
  than ``software``/``auto``/empty is an error naming the valid ones).
- ``hardware_engine_info(...)``: the ``EngineInfo`` of a library engine, off when forced.
- ``quiet_stderr(*noise)``: hold back a library's known noise on file descriptor 2.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cffi

from multifd_core.errors import LibraryNotFoundError, MultiFDError
from multifd_core.method import EngineInfo

__all__ = [
    "ENGINE_SWITCH_VALUES", "LibrarySpec", "OpenLibrary", "candidates", "clear_cache",
    "hardware_engine_info", "open_library", "quiet_stderr", "software_forced",
]

#: What ``$MULTIFD_<METHOD>_ENGINE`` may hold: unset/empty or ``auto`` (the best available
#: engine) and ``software`` (only the software engine).
ENGINE_SWITCH_VALUES = ("auto", "software")


@dataclass(frozen=True)
class LibrarySpec:
    """What to look for, how to check it, and what to tell the user when it is missing.

    ``label`` names the library in messages ("libqatzip"); ``env`` is the variable naming its
    file ("MULTIFD_QATZIP_LIBRARY"); ``find_name`` goes to ``ctypes.util.find_library``
    ("qatzip"); ``sonames`` are tried through the system loader, the first one is shown in the
    hint; ``dependencies`` are preloaded from the library's folder; every one of ``symbols``
    must resolve (else the file is refused as "not this library"); ``install`` says how to get
    it (one or more sentences); ``version(lib, ffi)``, when given, asks the opened library for
    its release (else the version comes from the file name, and says so)."""

    label: str
    env: str
    find_name: str
    sonames: tuple[str, ...]
    dependencies: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()
    install: str = ""
    version: Callable[[Any, Any], str | None] | None = None


@dataclass(eq=False)  # a handle: equal only to itself, hashable (functools.cache works on it)
class OpenLibrary:
    """An opened library: ``lib`` (cffi's handle), ``path`` (the real file), ``version`` and
    where it came from (``version_source``: "library", "file name", or "" when unknown),
    ``keep`` (dependency handles, kept alive with it) and ``ready`` (the plugin sets it once its
    one-time set-up, e.g. a log level, ran; ``open_library`` returns the same object per path).
    """

    lib: Any
    path: str
    version: str | None
    keep: list[Any] = field(default_factory=list)
    ready: bool = False
    version_source: str = ""

    @property
    def version_label(self) -> str | None:
        """The version as ``multifd methods`` shows it: the library's own answer as it is, a
        file-name version marked as such (``libisal.so.2.0.30`` says 2.0.30, the release is
        2.30)."""
        if self.version is None or self.version_source == "library":
            return self.version
        return f"{self.version} ({self.version_source or 'unknown source'})"


_lock = threading.Lock()
_cache: dict[tuple[str, str], OpenLibrary] = {}
_missing: dict[tuple[str, str], str] = {}


@functools.cache
def _find_library(name: str) -> str | None:
    """``ctypes.util.find_library``, once per name (it runs ldconfig or a compiler)."""
    return ctypes.util.find_library(name)


def candidates(spec: LibrarySpec) -> list[tuple[str, str]]:
    """(how, name-or-path) pairs to try, in order."""
    explicit = os.environ.get(spec.env, "").strip()
    if explicit:
        return [(f"${spec.env}", explicit)]
    out: list[tuple[str, str]] = []
    found = _find_library(spec.find_name)
    if found:
        out.append((f"find_library({spec.find_name!r})", found))
    else:
        out.append((f"find_library({spec.find_name!r})", ""))
    out.extend(("system loader", s) for s in spec.sonames if s != found)
    return out


def open_library(spec: LibrarySpec, ffi: cffi.FFI) -> OpenLibrary:
    """Open the library or raise ``LibraryNotFoundError`` saying where we looked.

    Both outcomes are remembered per library and environment setting, so asking again (every
    ``engines()`` call) costs nothing; ``clear_cache()`` forgets them."""
    key = (spec.label, os.environ.get(spec.env, "").strip())
    with _lock:
        known = _missing.get(key)
    if known is not None:
        raise LibraryNotFoundError(known)
    try:
        return _open_library(spec, ffi)
    except LibraryNotFoundError as exc:
        with _lock:
            _missing[key] = str(exc)
        raise


def _open_library(spec: LibrarySpec, ffi: cffi.FFI) -> OpenLibrary:
    tried: list[str] = []
    if not os.environ.get(spec.env, "").strip():
        tried.append(f"${spec.env} (unset)")
    for how, name in candidates(spec):
        if not name:
            tried.append(f"{how}: nothing found")
            continue
        key = (spec.label, name)
        with _lock:
            if key in _cache:
                return _cache[key]
            try:
                opened = _open(spec, ffi, name)
            except OSError as exc:
                tried.append(f"{how}: {name} ({_short(exc)})")
                continue
            _cache[key] = opened
            return opened
    install = spec.install.strip()
    if install and not install.endswith((".", "!", "?")):
        install += "."
    raise LibraryNotFoundError(" ".join(part for part in (
        f"{spec.label} not found; looked at: {'; '.join(tried)}.", install,
        f"Or set {spec.env}=/path/to/{spec.sonames[0]}.") if part))


def _open(spec: LibrarySpec, ffi: cffi.FFI, name: str) -> OpenLibrary:
    keep: list[Any] = []
    if os.sep in name:
        if not os.path.exists(name):
            raise OSError(f"no such file: {name}")
        folder = os.path.dirname(os.path.realpath(name))
        for dep in spec.dependencies:
            dep_path = os.path.join(folder, dep)
            if os.path.exists(dep_path):
                keep.append(ffi.dlopen(dep_path, ffi.RTLD_NOW | ffi.RTLD_GLOBAL))
    lib = ffi.dlopen(name, ffi.RTLD_NOW)
    for symbol in spec.symbols:
        try:
            getattr(lib, symbol)
        except (AttributeError, NotImplementedError):
            raise OSError(f"opened, but it is not {spec.label}: no symbol {symbol}") from None
    path = os.path.realpath(name) if os.sep in name else (_mapped_path(name) or name)
    asked = None
    if spec.version is not None:
        try:
            asked = spec.version(lib, ffi)
        except (AttributeError, NotImplementedError, OSError):  # an older library: no call
            asked = None
    if asked:
        return OpenLibrary(lib, path, asked, keep, version_source="library")
    from_file = _file_version(path)
    return OpenLibrary(lib, path, from_file, keep, version_source="file name" if from_file
                       else "")


def _mapped_path(soname: str) -> str | None:
    """Where the system loader found ``soname`` (from this process's memory map)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith(soname):
                    return os.path.realpath(path)
    except OSError:
        return None
    return None


def _file_version(path: str) -> str | None:
    """``libfoo.so.3.2.0`` -> ``3.2.0`` (the file's version, not the release's)."""
    m = re.search(r"\.so\.([0-9][0-9.]*)$", os.path.basename(os.path.realpath(path)))
    return m.group(1) if m else None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0].split(".  Additionally")[0]
    return text.split(": ", 1)[-1][:160] if text.startswith("cannot load library") else text


def clear_cache() -> None:
    """Forget opened and missing libraries (tests that change the environment)."""
    with _lock:
        _cache.clear()
        _missing.clear()
    _find_library.cache_clear()


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def quiet_stderr(*noise: str) -> Iterator[None]:
    """Hold back lines a native library prints on stderr (file descriptor 2) while the block
    runs, and pass on every line that does not start with one of ``noise``.

    For set-up calls only (they are serialised): libqatzip prints "Cannot open /dev/vfio" on
    every session set-up on a machine without a QAT device."""
    with _stderr_lock:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                kept = [line for line in held.read().decode(errors="replace").splitlines(True)
                        if not line.startswith(noise)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()


def software_forced(env: str) -> bool:
    """``$env=software``: this endpoint uses only a plugin's software engine (``auto`` or
    unset: the best available). Any other value raises ``MultiFDError`` naming the valid ones,
    so a typo is not silently ignored."""
    raw = os.environ.get(env, "")
    value = raw.strip().lower()
    if value not in ("", *ENGINE_SWITCH_VALUES):
        raise MultiFDError(f"{env}={raw!r} is not a valid value: use "
                           f"{' or '.join(ENGINE_SWITCH_VALUES)} (or leave it unset)")
    return value == "software"


def hardware_engine_info(name: str, env: str, usable: bool, reason: str,
                         opened: OpenLibrary | None, kind: str = "hardware") -> EngineInfo:
    """The ``EngineInfo`` of a plugin's library engine (``kind`` "hardware", or "software"
    for a library running its own software path): available when ``usable`` and not forced off
    by ``$env=software``; ``reason`` says why (kept after "forced off by ..."); the library's
    path and version come from ``opened``."""
    if software_forced(env):
        usable = False
        reason = f"forced off by {env}=software" + (f" ({reason})" if reason else "")
    return EngineInfo(name, kind, usable, reason, opened.path if opened else None,
                      opened.version_label if opened else None)
