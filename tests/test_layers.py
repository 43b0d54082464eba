"""The packages' imports point one way: wire <- methods <- engine <- session, qemu <- front
ends (what the README's architecture table says)."""

from __future__ import annotations

import ast
from pathlib import Path

import multifd_core

ROOT = Path(multifd_core.__file__).parent
#: Each layer and the layers it may import from (besides itself and errors/version).
ALLOWED = {
    "wire": set(),
    "methods": {"wire"},
    "engine": {"wire", "methods"},
    "session": {"wire", "methods", "engine"},
    "qemu": {"wire", "methods", "engine", "session"},
}
BASE = {"multifd_core.errors", "multifd_core.version"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("multifd_core")}


def test_layers_import_only_the_layers_below() -> None:
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in (ROOT / layer).glob("*.py"):
            for mod in imports(path):
                parts = mod.split(".")
                if mod in BASE or len(parts) < 2 or parts[1] in ("errors", "version"):
                    continue
                target = parts[1]
                if target != layer and target not in allowed and mod != "multifd_core":
                    wrong.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert wrong == []


def test_no_layer_imports_the_package_root() -> None:
    """``multifd_core/__init__`` imports the layers, so a layer importing the root would run
    in a half-initialised package."""
    bad = [str(p.relative_to(ROOT)) for layer in ALLOWED for p in (ROOT / layer).glob("*.py")
           if "multifd_core" in {m for m in imports(p) if m.count(".") == 0}
           or any(m in ("multifd_core.API_VERSION", "multifd_core.__version__")
                  for m in imports(p))]
    assert bad == []
