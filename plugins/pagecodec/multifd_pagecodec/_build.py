"""cffi API-mode build of ``multifd_pagecodec._pagecodec`` (run by setup.py's cffi_modules).

Links zlib, and ISA-L when a probe compile finds ``isa-l/igzip_lib.h`` and ``-lisal``
(``MULTIFD_PAGECODEC_ISAL=0`` builds without it). The extension is optional: without a
compiler or zlib headers the package installs without it and the plugins use their Python
per-page loop.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.name
PROBE = """#include <isa-l/igzip_lib.h>
int main(void) { struct isal_zstream s; isal_deflate_init(&s); return 0; }
"""


def has_isal() -> bool:
    """Whether this machine's C compiler can build and link against ISA-L."""
    if os.environ.get("MULTIFD_PAGECODEC_ISAL", "").strip() == "0":
        return False
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.c")
        src.write_text(PROBE)
        try:
            done = subprocess.run([*cc, str(src), "-o", str(Path(tmp, "probe")), "-lisal"],
                                  capture_output=True, check=False)
        except OSError:
            return False
    return done.returncode == 0


def builder() -> cffi.FFI:
    isal = has_isal()
    ffi = cffi.FFI()
    ffi.cdef((HERE / "pagecodec.h").read_text())
    ffi.set_source(
        f"{PACKAGE}._pagecodec",
        '#include <stdint.h>\n#include "pagecodec.h"\n',
        sources=[f"{PACKAGE}/pagecodec.c"],  # relative: setup.py runs in the project folder
        include_dirs=[PACKAGE],
        depends=[f"{PACKAGE}/pagecodec.h"],
        libraries=["z", *(["isal"] if isal else [])],
        define_macros=[("PAGECODEC_HAVE_ISAL", "1")] if isal else [],
        optional=True,
    )
    return ffi


ffibuilder = builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
