"""multifd-qatzip: QEMU's ``qatzip`` multifd method (flag 0x20) as a multifd plugin.

Engines: the real libqatzip through cffi (a QAT device, or QATzip's own software backup, as
in QEMU), or a pure-software encoder/decoder of the same QZ-extended gzip format.
"""

from __future__ import annotations

from multifd_core.hookspecs import hookimpl
from multifd_qatzip.method import Qatzip

__version__ = "0.1.0"
__all__ = ["Qatzip", "multifd_register_methods"]


@hookimpl
def multifd_register_methods(register) -> None:
    register(Qatzip)
