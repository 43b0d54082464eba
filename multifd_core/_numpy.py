"""numpy, imported without the pool of BLAS threads its OpenBLAS starts (the ``multifd``
command imports this first).

multifd never calls BLAS. numpy's wheels bundle OpenBLAS, which starts a thread per further core as
it loads; each spins for about 0.15 CPU-seconds before it sleeps, in every ``multifd``
process (measured on 2 cores: 0.22 against 0.07 user-seconds for ``import numpy`` and a 0.5 s
sleep). So unless numpy is loaded already or the user chose ``OPENBLAS_NUM_THREADS``, numpy
is imported here with it set to 1, and the variable is removed again: the process's
environment and its children's are left as they were.
"""

from __future__ import annotations

import os
import sys

_VAR = "OPENBLAS_NUM_THREADS"

if "numpy" not in sys.modules and _VAR not in os.environ:
    os.environ[_VAR] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        os.environ.pop(_VAR, None)
