"""multifd-uadk: QEMU's ``uadk`` multifd method (flag 0x10) as a multifd plugin.

Engines: a HiSilicon ZIP accelerator through UADK (libwd_comp, cffi ABI mode), or software
(sends raw pages as QEMU does without hardware; decodes zlib blobs with zlib).
"""

from __future__ import annotations

from multifd_core.hookspecs import hookimpl
from multifd_uadk.method import Uadk

__version__ = "0.1.0"
__all__ = ["Uadk", "multifd_register_methods"]


@hookimpl
def multifd_register_methods(register) -> None:
    register(Uadk)
