"""multifd: QEMU's multifd migration data path in Python.

The names a method plugin needs are importable from here: ``Method``, ``hookimpl``,
``MethodOptions``, ``EngineInfo``, ``LevelRange``, ``MethodError``.
"""

__version__ = "0.1.0"
#: The method-plugin API version this core implements. A plugin declares the API it was
#: built for (``Method.api_version``); a plugin whose major version differs is refused.
API_VERSION = "1.0"

from multifd_core.errors import MethodError, MultiFDError  # noqa: E402
from multifd_core.hookspecs import hookimpl  # noqa: E402
from multifd_core.method import EngineInfo, LevelRange, Method, MethodOptions  # noqa: E402

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
