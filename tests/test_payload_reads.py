"""A method's ``recv`` must read exactly its packet's payload. One that returns without reading
it, or reads raw pages of another size than the payload, would leave the channel inside the
packet, and the next header would fail with a confusing magic error one packet late. Every path
that calls ``recv`` (the receiver's channel threads, ``MethodHarness`` and so the conformance
kit) must name the packet where it happens."""

from __future__ import annotations

import socket

import pytest

from multifd_core import Method, hookimpl, wire
from multifd_core.engine.harness import MethodHarness
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.receiver import Receiver
from multifd_core.errors import MethodError, WireError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.nocomp import NoCompression
from multifd_core.methods.registry import default_registry

PS = 4096


class _Unread(NoCompression):
    """Returns from recv without touching the payload."""

    name = "unread"

    @hookimpl
    def recv(self, channel, packet):
        return None


class _RawInto(_Unread):
    """Reads raw pages straight into the destination without checking next_packet_size
    (a plugin that forgot the check none makes)."""

    name = "rawinto"

    def max_payload(self, normal_pages: int) -> int:
        return normal_pages * self.page_size + PS

    @hookimpl
    def recv(self, channel, packet):
        packet.readinto_pages()


def _packet(num: int, size: int, page: int = 1) -> bytes:
    return bytes(wire.encode_ram_packet(page_size=PS, flags=0, packet_num=num, ramblock="ram",
                                        normal=[page * PS], next_packet_size=size))


def _receive(method: Method, stream: bytes) -> tuple[BaseException, RamBlock]:
    block = RamBlock.zeros("ram", 8 * PS)
    rx = Receiver(method, channels=1, timeout=10)
    rx.set_blocks([block])
    ours, theirs = socket.socketpair()
    ours.sendall(wire.encode_init(bytes(16), 0) + stream)
    ours.close()
    rx.accept_channel(theirs)
    with pytest.raises(WireError) as err:
        rx.finish()
    rx.close()
    return err.value, block


def test_receiver_names_the_packet_a_method_left_unread() -> None:
    # Packet 7's payload, then a good packet 8: the error is packet 7's, not a magic error.
    err, _ = _receive(_Unread(), _packet(7, PS) + b"\x55" * PS + _packet(8, PS) + b"\x66" * PS)
    assert "method unread returned from recv without reading the payload of packet 7" \
        in str(err), err
    assert (err.field, err.channel) == ("payload", 0)


@pytest.mark.parametrize(("method", "size"), [("rawinto", PS - 100), ("rawinto", PS + 100),
                                              ("rawinto", 0), ("none", PS - 1), ("none", 0)])
def test_raw_pages_of_another_size_fail_at_that_packet(method: str, size: int) -> None:
    """readinto_pages reads normal_pages x page_size bytes; a payload of another size is
    refused before anything is read, at the packet that declares it."""
    m = _RawInto() if method == "rawinto" else default_registry().create("none")
    err, block = _receive(m, _packet(3, size) + b"\x55" * size + _packet(4, PS, 2)
                          + b"\x66" * PS)
    assert f"packet size received {size} size expected {PS} (packet 3)" in str(err), err
    assert err.field == "next_packet_size"
    assert not block.array.any()  # nothing read into the pages


def test_harness_names_a_method_that_left_its_payload_unread() -> None:
    """MethodHarness (and so MethodConformance, built on it) checks what the receiver does."""
    with MethodHarness(_Unread(MethodOptions(page_size=PS))) as h:
        with pytest.raises(MethodError, match="without reading the payload of packet 1"):
            h.decode(b"\x55" * PS, 1)
    with MethodHarness(_RawInto(MethodOptions(page_size=PS))) as h:
        with pytest.raises(MethodError, match=f"packet size received {PS - 1} size expected"):
            h.decode(b"\x55" * (PS - 1), 1)
        assert h.decode(b"\x55" * PS, 1).tobytes() == b"\x55" * PS
