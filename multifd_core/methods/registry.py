"""The method registry: built-in ``none`` plus every ``multifd.methods`` entry point.

Each entry point is loaded in isolation: one that fails to import, registers nothing valid,
was built for another core API, or claims a code already taken is reported in ``failed`` and
never breaks the host (unless strict mode asks for an error). Environment:

``MULTIFD_PLUGINS``         comma-separated entry-point names to load; empty: load none;
                            ``-name`` entries skip a plugin and load the others.
``MULTIFD_STRICT_PLUGINS``  ``1``: a plugin that fails to load is an error.

A lazy registry (the process-wide one) imports a plugin only when it is needed: asked for a
method by name, it imports the entry point of that name first, and every other entry point only
if that does not provide the method; listing the methods (``names``, ``entries``, ``failed``)
imports them all. A session that names its method thus loads that one plugin, not every
installed library's bindings.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from multifd_core.errors import PluginError, UnknownMethodError
from multifd_core.methods import nocomp
from multifd_core.methods.hookspecs import PROJECT, RegistrationSpec, bind  # noqa: F401 (bind: re-exported)
from multifd_core.methods.method import API_VERSION, Method, MethodOptions
from multifd_core.version import __version__ as CORE_VERSION
from multifd_core.wire import COMPRESSION_BITS, COMPRESSION_MASK, RESERVED_CODES

log = logging.getLogger("multifd.registry")
#: The plugin name of the built-in ``none``: never replaced, never refused.
BUILTIN = "none"

ENTRY_POINT_GROUP = "multifd.methods"
HOOK_NAMES = ("send_setup", "send_prepare", "send_cleanup", "recv_setup", "recv", "recv_cleanup")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

#: Where the methods QEMU knows come from, for the install hint.
KNOWN_DISTRIBUTIONS = {name: f"multifd-{name}" for name in RESERVED_CODES if name != "none"}


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class and where it comes from."""

    cls: type[Method]
    plugin: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def code(self) -> int:
        return self.cls.code


@dataclass(frozen=True)
class FailedPlugin:
    plugin: str
    distribution: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "distribution": self.distribution, "error": self.error}


def api_compatible(declared: str) -> bool:
    """A plugin is compatible when its API major version equals the core's."""
    return str(declared).split(".")[0] == API_VERSION.split(".")[0]


class MethodRegistry:
    """Methods by name and by flag code."""

    def __init__(self, *, entry_points: bool = True, strict: bool | None = None,
                 only: Iterable[str] | None = None, lazy: bool = False) -> None:
        if strict is None:
            strict = os.environ.get("MULTIFD_STRICT_PLUGINS", "") not in ("", "0")
        skip: set[str] = set()
        by_env = only is None and "MULTIFD_PLUGINS" in os.environ
        if by_env:
            items = [p.strip() for p in os.environ["MULTIFD_PLUGINS"].split(",") if p.strip()]
            skip = {p[1:] for p in items if p.startswith("-")}
            chosen = [p for p in items if not p.startswith("-")]
            only = chosen if chosen or not skip else None
        self.strict = strict
        self._only = None if only is None else set(only)
        self._methods: dict[str, MethodEntry] = {}
        self._failed: list[FailedPlugin] = []
        #: Entry points not imported yet (lazy mode), by name.
        self._pending: dict[str, list[metadata.EntryPoint]] = {}
        #: Installed entry points that MULTIFD_PLUGINS left out: name -> distribution.
        self.excluded: dict[str, str] = {}
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(RegistrationSpec)
        self._load_module(nocomp, BUILTIN, "multifd-core", CORE_VERSION)
        if entry_points:
            eps = _entry_points()
            for ep in eps:
                if (self._only is not None and ep.name not in self._only) or ep.name in skip:
                    if by_env:
                        self.excluded[ep.name] = ep.dist.name if ep.dist is not None else "?"
                    continue
                self._pending.setdefault(ep.name, []).append(ep)
            if self.excluded:
                log.info("MULTIFD_PLUGINS excludes the installed plugin(s) %s",
                         ", ".join(sorted(self.excluded)))
            for missing in sorted((self._only or set()) - {ep.name for ep in eps} - {"none"}):
                self._failed.append(FailedPlugin(
                    missing, "?", f"selected by MULTIFD_PLUGINS but no installed distribution "
                    f"has a {ENTRY_POINT_GROUP} entry point named {missing!r}"))
        if not lazy or self.strict:
            self.load_all()
        if self.strict and self._failed:
            raise PluginError("; ".join(f"plugin {f.plugin} ({f.distribution}) failed: {f.error}"
                                        for f in self._failed))

    # ------------------------------------------------------------------ loading

    @property
    def failed(self) -> list[FailedPlugin]:
        """Plugins that failed to load (every installed one is tried first)."""
        self.load_all()
        return self._failed

    def load_all(self) -> None:
        """Import every entry point not imported yet."""
        while self._pending:
            self._load_pending(next(iter(self._pending)))

    def _load_pending(self, name: str) -> None:
        for ep in self._pending.pop(name, []):
            self._load_entry_point(ep)

    def _ensure(self, name: str) -> None:
        """Import what may provide method ``name``: its namesake entry point, else all."""
        if name in self._methods or not self._pending:
            return
        self._load_pending(name)
        if name not in self._methods:
            self.load_all()

    def _load_entry_point(self, ep: metadata.EntryPoint) -> None:
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the host
            self._failed.append(FailedPlugin(ep.name, dist, f"import failed: {exc!r}"))
            log.info("plugin %s (%s) failed to import:\n%s", ep.name, dist,
                     "".join(traceback.format_exception(exc)).rstrip())
            return
        self._load_module(module, ep.name, dist, version)

    def _load_module(self, module: ModuleType | Any, plugin: str, dist: str,
                     version: str) -> None:
        found: list[type] = []
        try:
            if self._pm.is_registered(module):
                return
            self._pm.register(module, name=f"{plugin}@{dist}")
            impls = [i for i in self._pm.hook.multifd_register_methods.get_hookimpls()
                     if i.plugin is module]
            if not impls:
                raise PluginError("it implements no multifd_register_methods hook")
            for impl in impls:
                impl.function(register=found.append)
            if not found:
                raise PluginError("it registered no method")
        except Exception as exc:
            self._failed.append(FailedPlugin(plugin, dist, f"registration failed: {exc}"))
            log.info("plugin %s (%s) failed to register:\n%s", plugin, dist,
                     "".join(traceback.format_exception(exc)).rstrip())
            return
        for cls in found:
            try:
                self.add(cls, plugin=plugin, distribution=dist, version=version)
            except PluginError as exc:
                self._failed.append(FailedPlugin(plugin, dist, str(exc)))

    def add(self, cls: type, *, plugin: str = "local", distribution: str = "local",
            version: str = "0") -> MethodEntry:
        """Register a method class after checking its declaration."""
        check_method_class(cls)
        name, code = cls.name, cls.code
        for other in list(self._methods.values()):
            if other.plugin == BUILTIN and name == other.name:
                raise PluginError(f"method {name!r} from {distribution} is already provided by "
                                  f"{other.distribution} (built in)")
            if other.name == name:
                # As for a shared code: neither can be trusted to own the name.
                del self._methods[name]
                self._failed.append(FailedPlugin(
                    other.plugin, other.distribution,
                    f"method name {name!r} claimed by both {other.distribution} and "
                    f"{distribution}; both refused"))
                raise PluginError(f"method name {name!r} claimed by both {distribution} and "
                                  f"{other.distribution}; both refused")
            if other.code == code:
                # Neither can be trusted to own the code: refuse both.
                del self._methods[other.name]
                self._failed.append(FailedPlugin(
                    other.plugin, other.distribution,
                    f"flag code {code:#04x} claimed by both {other.name!r} ({other.distribution})"
                    f" and {name!r} ({distribution}); both refused"))
                raise PluginError(
                    f"flag code {code:#04x} claimed by both {name!r} ({distribution}) and "
                    f"{other.name!r} ({other.distribution}); both refused")
        entry = MethodEntry(cls, plugin, distribution, version)
        self._methods[name] = entry
        return entry

    # ------------------------------------------------------------------ lookup

    def names(self) -> list[str]:
        self.load_all()
        return sorted(self._methods, key=lambda n: (self._methods[n].code, n))

    def entries(self) -> list[MethodEntry]:
        return [self._methods[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self._ensure(name)
        return name in self._methods

    def get(self, name: str) -> MethodEntry:
        self._ensure(name)
        try:
            return self._methods[name]
        except KeyError:
            raise UnknownMethodError(self.unknown_message(name)) from None

    def excluded_plugin(self, name: str) -> str | None:
        """The distribution of ``name`` when it is installed but MULTIFD_PLUGINS left it out."""
        return self.excluded.get(name)

    def unknown_message(self, name: str) -> str:
        text = f"unknown method {name!r}; installed: {', '.join(self.names())}"
        failed = [f for f in self.failed if f.plugin == name]  # names() loaded them all
        if name in self.excluded:
            text += (f"; {name!r} ({self.excluded[name]}) is installed but excluded by "
                     f"MULTIFD_PLUGINS={os.environ.get('MULTIFD_PLUGINS', '')!r}")
        elif failed:
            text += f"; plugin {name!r} is installed but failed to load: {failed[0].error}"
        elif name in KNOWN_DISTRIBUTIONS:
            text += f"; install it with: pip install {KNOWN_DISTRIBUTIONS[name]}"
        else:
            text += "; a third-party method is installed from its own distribution"
        return text

    def create(self, name: str, options: MethodOptions | None = None) -> Method:
        """A method instance for one session (checks level and engine)."""
        return self.get(name).cls(options or MethodOptions())


def check_method_class(cls: Any) -> None:
    """Refuse a method class whose declaration the core cannot trust."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise PluginError(f"{cls!r} is not a multifd_core.Method subclass")
    name, code = getattr(cls, "name", ""), getattr(cls, "code", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginError(f"method name {name!r} of {cls.__qualname__} must match "
                          f"{_NAME_RE.pattern}")
    if not isinstance(code, int) or isinstance(code, bool):
        raise PluginError(f"method {name!r} declares code {code!r}: a code is an int")
    if code & ~COMPRESSION_MASK:
        raise PluginError(f"method {name!r} declares code {code:#04x}, outside the "
                          f"compression field {COMPRESSION_MASK:#04x}; a third-party method "
                          f"takes one of the free codes: {_free_codes()}")
    reserved_name = {v: k for k, v in RESERVED_CODES.items()}.get(code)
    if reserved_name is not None and reserved_name != name:
        raise PluginError(
            f"method {name!r} claims code {code:#04x}, which QEMU reserves for "
            f"{reserved_name!r}; a third-party method takes a value with two or more bits "
            f"of {COMPRESSION_MASK:#04x} (free: {_free_codes()})")
    if name in RESERVED_CODES and RESERVED_CODES[name] != code:
        raise PluginError(f"method {name!r} must use QEMU's code {RESERVED_CODES[name]:#04x}, "
                          f"not {code:#04x}")
    if not api_compatible(getattr(cls, "api_version", "")):
        raise PluginError(f"method {name!r} was built for multifd-core API "
                          f"{cls.api_version}; this core provides API {API_VERSION}")
    for hook in HOOK_NAMES:
        fn = getattr(cls, hook, None)
        if fn is None or getattr(fn, f"{PROJECT}_impl", None) is None:
            raise PluginError(f"method {name!r} does not implement hook {hook} "
                              f"(decorate it with multifd_core.hookimpl)")


#: Codes a third-party method may take: values of the compression field with two or more
#: bits set. QEMU's methods use 0 and the single bits; QEMU checks ``flags & 0x3E`` for
#: equality with its own code, so these values travel only between endpoints of this project.
THIRD_PARTY_CODES = tuple(c for c in range(2, COMPRESSION_MASK + 1, 2)
                          if c & COMPRESSION_MASK == c and c not in COMPRESSION_BITS)


def _free_codes() -> str:
    """Every code a third-party method may take, minus those taken by the methods this
    project knows of (docs/method-codes.md)."""
    return ", ".join(f"{c:#04x}" for c in THIRD_PARTY_CODES if c not in CLAIMED_CODES)


#: Third-party codes claimed by known distributions (docs/method-codes.md lists them).
CLAIMED_CODES = {0x06: "multifd-lz4 (lz4, the example plugin)"}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


_default: MethodRegistry | None = None


def default_registry() -> MethodRegistry:
    """The process-wide registry: lazy, each plugin imported when first needed."""
    global _default
    if _default is None:
        _default = MethodRegistry(lazy=True)
    return _default
