"""The worked example of docs/writing-a-plugin.md section 10, run from the page itself."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from multifd_core.engine.harness import MethodHarness
from multifd_core.errors import MultiFDError
from multifd_core.methods.method import MethodOptions
from multifd_core.testing import MethodConformance, mixed_pages

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"


def load_example() -> types.ModuleType:
    """The guide's ``multifd_zdemo`` module: the python block that starts with its docstring."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    (source,) = [b for b in blocks if b.startswith('"""multifd-zdemo')]
    module = types.ModuleType("multifd_zdemo")
    module.__file__ = f"{GUIDE}#multifd_zdemo"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 (our docs)
    sys.modules["multifd_zdemo"] = module
    return module


zdemo = load_example()


class TestZdemoConformance(MethodConformance):
    method_cls = zdemo.Zdemo


def test_both_engines_write_the_same_bytes():
    pages = mixed_pages(128, 4096, np.random.default_rng(5))
    payloads = []
    for engine in ("libz", "python"):
        with MethodHarness(zdemo.Zdemo(MethodOptions(engine=engine))) as h:
            payloads.append(h.encode(pages))
    assert payloads[0] == payloads[1]


def test_library_engine_reports_the_library_version():
    (libz, python) = zdemo.Zdemo.engines()
    assert libz.available and libz.library.startswith("/")
    assert libz.library_version == zdemo.ffi.string(
        zdemo.open_library(zdemo.SPEC, zdemo.ffi).lib.zlibVersion()).decode()


def test_engine_switch(monkeypatch):
    monkeypatch.setenv(zdemo.ENV_ENGINE, "software")
    libz = zdemo.Zdemo.engines()[0]
    assert not libz.available and libz.reason == f"forced off by {zdemo.ENV_ENGINE}=software"
    assert zdemo.Zdemo(MethodOptions()).engine == "python"
    monkeypatch.setenv(zdemo.ENV_ENGINE, "sofware")
    with pytest.raises(MultiFDError, match="use auto or software"):
        zdemo.Zdemo(MethodOptions())
