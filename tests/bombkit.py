"""A decompression bomb fed to a method in a fresh process, with its peak-RSS growth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_MEASURE = textwrap.dedent("""
    import resource
    from multifd_core.errors import MethodError
    from multifd_core.engine.harness import MethodHarness
    from multifd_core.methods.registry import default_registry
    from multifd_core.methods.method import MethodOptions

    h = MethodHarness(default_registry().create(METHOD, MethodOptions(level=1)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        h.decode(bomb, 1)
        print("DECODED")
    except MethodError as exc:
        print("REFUSED", exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PAYLOAD", len(bomb))
    print("GROWTH_KIB", after - before)
""")


def assert_bomb_refused(method: str, make_bomb: str) -> None:
    """Run ``make_bomb`` (code that sets ``bomb``: a one-page payload that inflates to 100
    MiB) and decode it with ``method`` in a new interpreter: refused with QEMU's message,
    the payload small, and the peak RSS grown by under 16 MiB."""
    script = textwrap.dedent(make_bomb) + f"\nMETHOD = {method!r}\n" + _MEASURE
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert "REFUSED" in lines, run.stdout
    assert "packet size received more than 4096 size expected 4096" in lines["REFUSED"]
    assert int(lines["PAYLOAD"]) <= 1 << 20
    assert int(lines["GROWTH_KIB"]) < 16 * 1024, f"peak RSS grew {lines['GROWTH_KIB']} KiB"
