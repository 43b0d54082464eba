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

import atexit
import contextlib
import ctypes.util
import functools
import os
import re
import select
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cffi

from multifd_core.errors import LibraryNotFoundError, MultiFDError
from multifd_core.methods.method import EngineInfo

__all__ = [
    "ENGINE_SWITCH_VALUES", "HardwareProbe", "LibrarySpec", "OpenLibrary", "candidates",
    "clear_cache", "filter_stderr", "hardware_engine_info", "open_library", "quiet_stderr",
    "software_forced",
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
                      opened.version_label if opened else None, path="native")


class _StderrFilter:
    """A pipe in place of file descriptor 2 and a thread that passes everything on to the
    original stderr except the exact ``noise`` byte strings (wherever they fall in the
    stream). A trailing prefix of a noise string is held back at most ``_HOLD`` seconds."""

    _HOLD = 0.05

    def __init__(self, noise: tuple[bytes, ...]) -> None:
        self.noise = noise
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, self.write = os.pipe()
        os.dup2(self.write, 2)
        st = os.fstat(2)
        self.identity = (st.st_dev, st.st_ino)
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True,
                                       name="stderr-filter")
        self.thread.start()

    def active(self) -> bool:
        """Whether descriptor 2 is still this filter's pipe (a test harness may swap it)."""
        try:
            st = os.fstat(2)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def _pump(self, read: int) -> None:
        held = b""
        try:
            while True:
                ready, _, _ = select.select([read], [], [], self._HOLD if held else None)
                if not ready:
                    out, held = held, b""
                else:
                    chunk = os.read(read, 1 << 16)
                    if not chunk:
                        break
                    data = held + chunk
                    for n in self.noise:
                        data = data.replace(n, b"")
                    keep = _noise_prefix(data, self.noise)
                    out, held = data[:len(data) - keep], data[len(data) - keep:]
                _write_all(self.saved, out)
            _write_all(self.saved, held)
        finally:
            os.close(read)
            os.close(self.saved)

    def stop(self) -> None:
        """Put the original stderr back (if ours is still in place) and drain the pipe."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if self.write < 0:
            return
        if self.active():
            os.dup2(self.saved, 2)
        os.close(self.write)  # the last write end: the thread reads EOF, flushes, ends
        self.write = -1
        self.thread.join(2)


def _noise_prefix(data: bytes, noise: tuple[bytes, ...]) -> int:
    """Length of the longest end of ``data`` that begins one of the noise strings."""
    best = 0
    for n in noise:
        for k in range(min(len(n) - 1, len(data)), best, -1):
            if data.endswith(n[:k]):
                best = k
                break
    return best


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            return


_filter: _StderrFilter | None = None


def filter_stderr(*noise: str) -> None:
    """From now on, drop the lines ``noise`` (whole lines, newline included) that native
    libraries write on stderr, for this whole process and its children; everything else passes
    through unchanged and in order. For libraries that print on every call (libqatzip without
    a QAT device prints "Cannot open /dev/vfio" per compress and decompress call), where
    ``quiet_stderr`` around set-up calls is not enough. Idempotent; undone at exit."""
    global _filter
    lines = tuple(n.encode() + (b"" if n.endswith("\n") else b"\n") for n in noise)
    with _stderr_lock:
        if _filter is not None and _filter.active() and set(lines) <= set(_filter.noise):
            return
        if _filter is not None:
            lines = tuple(dict.fromkeys((*_filter.noise, *lines)))
            _filter.stop()
        else:
            atexit.register(_stop_filter)
        _filter = _StderrFilter(lines)


def _stop_filter() -> None:
    global _filter
    with _stderr_lock:
        if _filter is not None:
            _filter.stop()
            _filter = None


class HardwareProbe:
    """Whether a library's hardware path works here, asked once per library file.

    ``load()`` opens the library (``LibraryNotFoundError`` when it is missing);
    ``probe(opened)`` tries the device and returns ``(usable, reason)``. Calling the probe
    object returns ``(usable, reason, opened library or None)``; the answer for each library
    path is kept, and concurrent first calls probe once."""

    def __init__(self, load: Callable[[], Any],
                 probe: Callable[[Any], tuple[bool, str]]) -> None:
        self.load, self.probe = load, probe
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[bool, str]] = {}

    def __call__(self) -> tuple[bool, str, Any]:
        try:
            opened = self.load()
        except LibraryNotFoundError as exc:
            return False, f"no library: {exc}", None
        with self._lock:
            if opened.path not in self._answers:
                self._answers[opened.path] = self.probe(opened)
            usable, reason = self._answers[opened.path]
        return usable, reason, opened
