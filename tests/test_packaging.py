"""What every distribution declares, read from the sources (fast). Building them, installing
them into clean venvs and running ``multifd methods`` there takes minutes: that is
``scripts/check-dists``, which ``scripts/test`` runs after pytest (always in CI)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

REPO = Path(__file__).resolve().parents[1]
PROJECTS = [REPO, *sorted(p.parent for p in REPO.glob("plugins/*/pyproject.toml")),
            *sorted(p.parent for p in REPO.glob("examples/*/pyproject.toml"))]
URL = "https://github.com/multifd/multifd"
#: A Markdown link or image target that is not absolute (it breaks on a package index).
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)]+)\)")


def project(path: Path) -> dict:
    with open(path / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: p.name)
def test_metadata(path: Path) -> None:
    data = project(path)
    meta = data["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert (path / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # PEP 639
    assert meta["authors"] and meta["classifiers"] and meta["keywords"]
    assert meta["urls"]["Repository"] == URL and meta["urls"]["Issues"] == f"{URL}/issues"
    # license expressions need setuptools >= 77 (older ones warn or fail)
    assert data["build-system"]["requires"][0] == "setuptools>=77"
    for dep in meta.get("dependencies", []):
        if dep.startswith(("multifd-core", "multifd-pagecodec")):
            assert dep.endswith(">=0.1,<0.2"), dep  # a compatible range, not an open floor


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: p.name)
def test_readme_links_work_on_a_package_index(path: Path) -> None:
    readme = (path / project(path)["project"]["readme"]).read_text()
    assert not RELATIVE_LINK.findall(readme)
    assert "../" not in readme


def test_plugin_readmes_install_from_a_wheel() -> None:
    for path in PROJECTS[1:]:
        readme = (path / "README.md").read_text()
        assert re.search(r"pip install dist/multifd_\w+-\*\.whl|pip install multifd-\w+",
                         readme), path


def test_core_ships_py_typed_and_a_slim_testing_extra() -> None:
    data = project(REPO)
    assert (REPO / "multifd_core/py.typed").exists()
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["multifd_core"]
    assert data["project"]["optional-dependencies"]["testing"] == ["pytest>=7"]
    assert "prune tests" in (REPO / "MANIFEST.in").read_text()


def test_demo_help_does_not_run_the_set_up(tmp_path: Path) -> None:
    """``./scripts/demo --help`` prints its help and exits; the set-up (which would rewrite
    .cache/setup.log and run apt and pip) does not run."""
    log = REPO / ".cache/setup.log"
    before = log.stat().st_mtime_ns if log.exists() else None
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    # A stand-in for apt-get and pip that would leave a trace if anything called them.
    for tool in ("apt-get", "pip"):
        (tmp_path / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/{tool}.ran\n")
        (tmp_path / tool).chmod(0o755)
    proc = subprocess.run([str(REPO / "scripts/demo"), "--help"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: ./scripts/demo")
    assert "--size-mib" in proc.stdout
    assert (log.stat().st_mtime_ns if log.exists() else None) == before
    assert not list(tmp_path.glob("*.ran"))
