"""multifd: QEMU's multifd migration data path in Python.

The names a method plugin needs are importable from here: ``Method``, ``hookimpl``,
``MethodOptions``, ``EngineInfo``, ``LevelRange``, ``MethodError``.

The layers are packages: ``wire`` (sans-IO formats), ``methods`` (the method contract and
registry), ``engine`` (RAM blocks, channel pipeline and threads), ``session`` (native sessions,
transport, output) and ``qemu`` (QEMU's main stream, capture, replay, snapshot files); the
front ends (``cli``, ``demo``, ``testing``, ...) sit on top.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from multifd_core.errors import MethodError, MultiFDError
from multifd_core.methods.hookspecs import hookimpl
from multifd_core.methods.method import API_VERSION, EngineInfo, LevelRange, Method, MethodOptions
from multifd_core.version import __version__

#: Module paths of the 0.1 layout that plugins import, and where they live now. They stay
#: importable (the same module objects) for plugins written against 0.1.
MOVED = {
    "multifd_core.context": "multifd_core.methods.context",
    "multifd_core.harness": "multifd_core.engine.harness",
    "multifd_core.hookspecs": "multifd_core.methods.hookspecs",
    "multifd_core.method": "multifd_core.methods.method",
    "multifd_core.native": "multifd_core.methods.native",
    "multifd_core.nocomp": "multifd_core.methods.nocomp",
    "multifd_core.perpage": "multifd_core.methods.perpage",
    "multifd_core.registry": "multifd_core.methods.registry",
    "multifd_core.ram": "multifd_core.engine.ram",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to (``MOVED``)."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())

__all__ = [
    "API_VERSION",
    "EngineInfo",
    "LevelRange",
    "Method",
    "MethodError",
    "MethodOptions",
    "MultiFDError",
    "__version__",
    "hookimpl",
]
