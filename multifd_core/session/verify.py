"""Recheck an output directory against its ``manifest.json`` (``multifd verify DIR``).

Every block file's length and digest (``engine.digest``: the algorithm the entry names), and
for a capture also ``prefix.bin`` and ``tail.bin`` (sha256) and ``vmdesc.json`` (length).
A block's digest is of the file's bytes as they are, so ``b3sum FILE`` (or ``sha256sum FILE``
for an older manifest) prints the same value: no multifd code is needed to check a result.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multifd_core.engine.digest import digest_of, manifest_digest
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MultiFDError


@dataclass
class Check:
    """One file's verdict."""

    file: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "ok": self.ok, "detail": self.detail}


def verify_directory(path: str | os.PathLike[str]) -> list[Check]:
    """Every check of ``path``'s manifest, in order (blocks, then prefix, tail, vmdesc)."""
    root = Path(path)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except FileNotFoundError:
        raise MultiFDError(f"{root}: no manifest.json (not a finished output)") from None
    except (OSError, ValueError) as exc:
        raise MultiFDError(f"{root}/manifest.json: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("blocks"), list):
        raise MultiFDError(f"{root}/manifest.json: no list of blocks")
    page_size = int(manifest.get("page_size", 4096))
    checks = [_block(root, entry, page_size) for entry in manifest["blocks"]]
    for key in ("prefix", "tail"):
        entry = manifest.get(key)
        if isinstance(entry, dict):
            checks.append(_small_file(root, entry))
    vmdesc = manifest.get("vmdesc")
    if isinstance(vmdesc, dict):
        checks.append(_length_only(root, vmdesc))
    return checks


def _safe(root: Path, name: Any) -> Path:
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise MultiFDError(f"manifest names a file outside the directory: {str(name)[:80]!r}")
    return root / name


def _block(root: Path, entry: dict[str, Any], page_size: int) -> Check:
    name = str(entry.get("file"))
    try:
        path = _safe(root, entry.get("file"))
        algorithm, want = manifest_digest(entry)
        block = RamBlock.from_file(path, str(entry.get("name", name)), page_size=page_size)
    except MultiFDError as exc:
        return Check(name, False, str(exc))
    try:
        if block.used_length != entry.get("length"):
            return Check(name, False, f"length {block.used_length}, manifest says "
                                      f"{entry.get('length')}")
        got = block.digest(algorithm)
    finally:
        block.close()
    if got != want:
        return Check(name, False, f"{algorithm} {got}, manifest says {want}")
    return Check(name, True, f"{algorithm} {got}")


def _small_file(root: Path, entry: dict[str, Any]) -> Check:
    name = str(entry.get("file"))
    try:
        data = _safe(root, entry.get("file")).read_bytes()
    except (OSError, MultiFDError) as exc:
        return Check(name, False, f"cannot read it: {exc}")
    got = hashlib.sha256(data).hexdigest()
    if len(data) != entry.get("length") or got != entry.get("sha256"):
        return Check(name, False, f"length {len(data)}, sha256 {got}: the manifest says "
                                  f"{entry.get('length')}, {entry.get('sha256')}")
    return Check(name, True, f"sha256 {got}")


def _length_only(root: Path, entry: dict[str, Any]) -> Check:
    name = str(entry.get("file"))
    try:
        size = _safe(root, entry.get("file")).stat().st_size
    except (OSError, MultiFDError) as exc:
        return Check(name, False, f"cannot read it: {exc}")
    if size != entry.get("length"):
        return Check(name, False, f"length {size}, manifest says {entry.get('length')}")
    return Check(name, True, f"length {size}")


__all__ = ["Check", "digest_of", "verify_directory"]
