"""What is specific to the lz4 example: the frame format, the engines, the entry point."""

from __future__ import annotations

import lz4.frame
import numpy as np
import pytest

from multifd_core.errors import MultiFDError
from multifd_core.harness import MethodHarness
from multifd_core.method import MAX_COMPRESSED_PAYLOAD, MethodOptions
from multifd_core.registry import MethodRegistry, check_method_class
from multifd_core.testing import make_pages, mixed_pages
from multifd_lz4 import Lz4

ENGINES = [e.name for e in Lz4.engines() if e.available]
FRAME_MAGIC = b"\x04\x22\x4d\x18"
END_MARK = bytes(4)


def packets(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [mixed_pages(int(k), 4096, rng) for k in rng.integers(1, 129, n)]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_channel_is_one_standard_lz4_frame(engine: str) -> None:
    """The payloads of one channel, plus an end mark, are one LZ4 frame any decoder reads."""
    pages = packets()
    with MethodHarness(Lz4(MethodOptions(engine=engine))) as h:
        payloads = [h.encode(p) for p in pages]
    assert payloads[0].startswith(FRAME_MAGIC)
    assert not any(p.startswith(FRAME_MAGIC) for p in payloads[1:])
    info = lz4.frame.get_frame_info(payloads[0])
    assert info["block_linked"] and info["block_checksum"] and info["block_size"] == 65536
    stream = b"".join(payloads) + END_MARK
    assert lz4.frame.decompress(stream) == b"".join(p.tobytes() for p in pages)


@pytest.mark.parametrize("engine", ENGINES)
def test_payload_bound_holds_for_incompressible_pages(engine: str) -> None:
    method = Lz4(MethodOptions(engine=engine))
    pages = make_pages("random", 128, 4096, np.random.default_rng(1))
    with MethodHarness(method) as h:
        for _ in range(2):  # the first packet also carries the frame header
            payload = h.encode(pages)
            assert len(payload) <= method.max_payload(128) <= MAX_COMPRESSED_PAYLOAD


def test_missing_library_falls_back_to_python_lz4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTIFD_LZ4_LIBRARY", "/nonexistent/liblz4.so.1")
    engines = {e.name: e for e in Lz4.engines()}
    assert not engines["liblz4"].available
    assert "apt-get install liblz4-1" in engines["liblz4"].reason
    assert "/nonexistent/liblz4.so.1" in engines["liblz4"].reason
    with pytest.raises(MultiFDError, match="engine liblz4 of method lz4 is not available"):
        Lz4(MethodOptions(engine="liblz4"))
    method = Lz4()
    assert method.engine == "python-lz4"
    pages = packets(2)
    with MethodHarness(method) as h:
        for p in pages:
            assert np.array_equal(h.roundtrip(p), p)


def test_levels_are_checked() -> None:
    assert Lz4(MethodOptions(level=12)).level == 12
    with pytest.raises(MultiFDError, match="level 13 is out of range for method lz4"):
        Lz4(MethodOptions(level=13))


def test_code_is_a_third_party_value() -> None:
    check_method_class(Lz4)
    assert Lz4.code == 0x06 and Lz4.code & 0x3E == Lz4.code and Lz4.code & (Lz4.code - 1)


def test_entry_point_registers_lz4() -> None:
    registry = MethodRegistry(only=["lz4"])
    entry = registry.get("lz4")
    assert entry.cls is Lz4
    assert entry.distribution == "multifd-lz4"
    assert not registry.failed
