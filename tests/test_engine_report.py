"""Each side's engine description: what a method instance reports, how it crosses the main
channel (checked like any peer value), and peers that predate it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from multifd_core.engine.ram import RamBlock
from multifd_core.errors import WireError
from multifd_core.loopback import migrate
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import default_registry
from multifd_core.session.report import describe, side_text
from multifd_core.wire import connection
from multifd_core.wire.protocol import SIDE_KEYS, parse_side

GOOD = {"method": "zstd", "level": 1, "engine": "software", "kind": "software",
        "library": "zstd", "library_version": "1.5.5", "path": "native"}


def test_parse_side_checks_every_field() -> None:
    assert parse_side(None, "ACCEPT") is None  # an older peer: no field
    assert parse_side(GOOD, "ACCEPT") == GOOD
    assert parse_side({**GOOD, "extra": 1}, "ACCEPT") == GOOD  # unknown keys dropped
    for bad, field in (([1], "engine"), ({**GOOD, "level": "1"}, "engine.level"),
                       ({**GOOD, "level": True}, "engine.level"),
                       ({**GOOD, "engine": None}, "engine.engine"),
                       ({**GOOD, "library": "x" * 201}, "engine.library")):
        with pytest.raises(WireError) as err:
            parse_side(bad, "DONE")
        assert err.value.field == field and "DONE" in str(err.value)


def test_describe_names_the_path_an_instance_runs() -> None:
    registry = default_registry()
    if "qpl" not in registry:
        pytest.skip("multifd-qpl is not installed: pip install -e plugins/qpl")
    fallback = describe(registry.create("qpl", MethodOptions(extra={"native": False})))
    assert set(fallback) == set(SIDE_KEYS)
    assert fallback["engine"] == "software" and fallback["path"] == "fallback"
    assert "Python per page" in fallback["library_version"]
    none = describe(registry.create("none"))
    assert none == {"method": "none", "level": None, "engine": "software", "kind": "software",
                    "library": None, "library_version": None, "path": "native"}
    assert side_text(none) == "none, engine software (software; native)"
    assert side_text(None) == "not reported (an older peer)"


def test_a_peer_without_engine_descriptions_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """ACCEPT and DONE as a peer from before the field sent them: the session runs and the
    summary says the peer's engine was not reported."""
    real = connection._body

    def old_peer(event: Any) -> dict[str, Any]:
        body = real(event)
        if isinstance(event, (connection.Accept, connection.Done)):
            body = {k: v for k, v in body.items() if k != "engine"}
        return body

    monkeypatch.setattr(connection, "_body", old_peer)
    src = RamBlock("pc.ram", np.arange(1 << 20, dtype=np.uint8))
    blocks, stats = migrate([src], method="none")
    assert np.array_equal(blocks[0].array, src.array)
    assert stats.receiver is None and stats.sender is not None
    assert stats.as_dict()["engines"] == {"sender": stats.sender, "receiver": None}
