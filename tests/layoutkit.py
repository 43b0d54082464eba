"""The struct-layout probe for a plugin whose vendor header Debian does not package."""

from __future__ import annotations

import os
from typing import Any

import pytest

from multifd_core.testing import assert_struct_layout


def check_optional_header(ffi: Any, env: str, default: str, plugin: str) -> None:
    """Probe the header named by ``$env`` (else ``default``) when it exists, else skip saying so
    (also in CI: no Debian release packages it, so CI cannot install it)."""
    header = os.environ.get(env) or default
    if not os.path.exists(header):
        pytest.skip(f"no {plugin} header at {header} (Debian does not package one); set {env} "
                    f"to a header to check the declarations against it")
    assert assert_struct_layout(ffi, header) > 0
