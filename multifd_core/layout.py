"""Check the struct layouts a cffi ABI-mode binding declares against the vendor's C header.

cffi's ABI mode trusts the declarations: a field at the wrong offset corrupts memory silently.
``struct_layout_report(ffi, "qatzip.h", include_dirs=[...])`` writes a C probe that prints
``sizeof`` of every declared struct, union and enum and ``offsetof`` of every struct field,
compiles it against the header with the system's C compiler, runs it and pairs each figure
with cffi's. ``check_struct_layout`` returns only the mismatches. Both raise
``LayoutProbeUnavailable`` when there is no compiler or no header (the conformance kit's
``assert_struct_layout`` turns that into a skip, or a failure under ``CI``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LayoutMismatch", "LayoutProbeUnavailable", "check_struct_layout",
           "declared_types", "struct_layout_report"]


class LayoutProbeUnavailable(OSError):
    """No C compiler, or the header is not there: the layout cannot be probed here."""


@dataclass(frozen=True)
class LayoutMismatch:
    """``what`` (``sizeof(T)`` or ``offsetof(T, field)``) differs: cffi's value, the header's
    (``None``: the header does not declare it)."""

    what: str
    cffi: int
    header: int | None

    def __str__(self) -> str:
        theirs = "not in the header" if self.header is None else f"header {self.header}"
        return f"{self.what}: cffi {self.cffi}, {theirs}"


def declared_types(ffi: Any) -> list[str]:
    """Every complete struct, union and enum the ffi declares, by its typedef name where it has
    one (``QzSession_T``), else as ``struct tag``/``union tag``."""
    typedefs, structs, unions = ffi.list_types()
    out: list[str] = []
    seen: set[Any] = set()
    candidates = [*typedefs, *(f"struct {s}" for s in structs),
                  *(f"union {u}" for u in unions)]
    for name in candidates:
        if name.split()[-1].startswith("$"):
            continue  # cffi's name for an anonymous struct: reached through its typedef
        t = ffi.typeof(name)
        if t.kind not in ("struct", "union", "enum") or t in seen:
            continue
        try:
            ffi.sizeof(t)
        except (ValueError, TypeError):  # declared but opaque (no fields): nothing to compare
            continue
        seen.add(t)
        out.append(name)
    return out


def _figures(ffi: Any, names: Iterable[str]) -> list[tuple[str, str, int]]:
    """(label, C expression, cffi's value) for each size and field offset."""
    out: list[tuple[str, str, int]] = []
    for name in names:
        t = ffi.typeof(name)
        out.append((name, f"sizeof({name})", ffi.sizeof(t)))
        if t.kind == "enum":
            continue
        for fname, f in t.fields or ():
            if fname and f.bitsize < 0:  # bit fields have no offsetof
                out.append((name, f"offsetof({name}, {fname})", f.offset))
    return out


def _compile_and_run(header: str, exprs: Sequence[str], include_dirs: Sequence[str],
                     defines: Sequence[str], cc: str, workdir: str) -> list[int] | str:
    """The values of ``exprs`` compiled against ``header``, or the compiler's error text."""
    lines = ["#include <stddef.h>", "#include <stdio.h>", f'#include "{header}"',
             "int main(void) {"]
    lines += [f'    printf("%zu\\n", (size_t)({e}));' for e in exprs]
    lines += ["    return 0;", "}"]
    src = os.path.join(workdir, "layout_probe.c")
    exe = os.path.join(workdir, "layout_probe")
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    cmd = [cc, "-std=gnu11", "-w", *(f"-I{d}" for d in include_dirs),
           *(f"-D{d}" for d in defines), "-o", exe, src]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        return built.stderr.strip() or f"{cc} exited with {built.returncode}"
    ran = subprocess.run([exe], capture_output=True, text=True, timeout=60, check=True)
    return [int(v) for v in ran.stdout.split()]


def struct_layout_report(ffi: Any, header: str, names: Iterable[str] | None = None, *,
                         include_dirs: Sequence[str] = (), defines: Sequence[str] = (),
                         cc: str | None = None) -> list[tuple[str, int, int | None]]:
    """``(what, cffi value, header value)`` for ``sizeof`` of each of ``names`` (default:
    ``declared_types(ffi)``) and ``offsetof`` of each of their fields; the header value is
    ``None`` for what the header does not declare.

    ``header`` is a path, or a name found in ``include_dirs``; ``defines`` are ``NAME[=VALUE]``
    macros for the probe (a header's build options); ``cc`` defaults to ``$CC``, then ``cc``.
    """
    compiler = cc or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise LayoutProbeUnavailable(f"no C compiler {compiler!r} to probe {header} "
                                     f"(apt-get install gcc, or set CC)")
    dirs = list(include_dirs)
    if os.sep in header:
        if not os.path.isfile(header):
            raise LayoutProbeUnavailable(f"header {header} not found")
        dirs.insert(0, os.path.dirname(os.path.abspath(header)))
        header = os.path.basename(header)
    elif not any(os.path.isfile(os.path.join(d, header)) for d in dirs) and not \
            os.path.isfile(os.path.join("/usr/include", header)):
        raise LayoutProbeUnavailable(f"header {header} not found in "
                                     f"{', '.join(dirs) or '/usr/include'}")
    figures = _figures(ffi, declared_types(ffi) if names is None else names)
    with tempfile.TemporaryDirectory(prefix="multifd-layout-") as work:
        values = _compile_and_run(header, [e for _, e, _ in figures], dirs, defines,
                                  compiler, work)
        if isinstance(values, str):  # find what the header lacks, one figure at a time
            single = [_compile_and_run(header, [e], dirs, defines, compiler, work)
                      for _, e, _ in figures]
            values = [v[0] if isinstance(v, list) else None for v in single]
    return [(e, ours, theirs) for (_, e, ours), theirs in zip(figures, values, strict=True)]


def check_struct_layout(ffi: Any, header: str, names: Iterable[str] | None = None,
                        **kwargs: Any) -> list[LayoutMismatch]:
    """The figures of ``struct_layout_report`` where cffi and the header disagree (empty:
    the declarations match the header)."""
    return [LayoutMismatch(what, ours, theirs)
            for what, ours, theirs in struct_layout_report(ffi, header, names, **kwargs)
            if ours != theirs]
