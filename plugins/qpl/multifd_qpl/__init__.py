"""multifd-qpl: QEMU's ``qpl`` multifd method (flag 0x08) as a multifd plugin.

Engines: Intel IAA through libqpl (cffi, ABI mode), or software raw DEFLATE with ISA-L
(``isal`` package) or zlib. Every engine writes the same bytes QEMU expects.
"""

from __future__ import annotations

from multifd_core.hookspecs import hookimpl
from multifd_qpl.method import Qpl

__version__ = "0.1.0"
__all__ = ["Qpl", "multifd_register_methods"]


@hookimpl
def multifd_register_methods(register) -> None:
    register(Qpl)
