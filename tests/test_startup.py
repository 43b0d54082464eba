"""What a ``multifd`` process starts with: numpy without OpenBLAS's spinning thread pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = ("import os\n"
         "import multifd_core.cli\n"
         "import numpy\n"
         "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))\n")


def _probe(tmp_path: Path, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env={**base, **env}, cwd=tmp_path).stdout.split()
    return int(out[0]), out[1]


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                reason="counts threads in /proc/self/task (Linux)")


def test_the_command_starts_no_blas_threads_and_leaves_the_environment(tmp_path: Path) -> None:
    threads, var = _probe(tmp_path)
    assert threads == 1  # OpenBLAS would add one per further core
    assert var == "None"  # set only while numpy loads: children inherit nothing


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a BLAS thread")
def test_a_user_choice_of_blas_threads_is_kept(tmp_path: Path) -> None:
    threads, var = _probe(tmp_path, OPENBLAS_NUM_THREADS="2")
    assert (threads, var) == (2, "2")
