"""What every method plugin's test module starts with: its imports, or a skip saying how to
install the plugin."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from multifd_core.testing import in_ci


def _load(name: str) -> Any:
    module, _, attribute = name.partition(":")
    loaded = importlib.import_module(module)
    if not attribute:
        return loaded
    try:
        return getattr(loaded, attribute)
    except AttributeError as exc:  # as ``from module import attribute`` would say
        raise ImportError(f"cannot import name {attribute!r} from {module!r}") from exc


def import_plugin(plugin: str, *names: str, what: str = "") -> list[Any]:
    """Import ``names`` (``"package.module"``, or ``"package.module:attribute"`` for one name
    in it) for the tests of ``plugins/<plugin>``, in order.

    When one is missing, the calling test module is skipped with "``what`` (default
    ``multifd-<plugin>``) is not installed: pip install -e plugins/<plugin>"; in CI the
    ImportError is raised instead."""
    try:
        return [_load(name) for name in names]
    except ImportError:  # pragma: no cover - depends on the environment
        if in_ci():
            raise
        pytest.skip(f"{what or f'multifd-{plugin}'} is not installed: "
                    f"pip install -e plugins/{plugin}", allow_module_level=True)
