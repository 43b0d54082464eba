"""The native main channel's state machine, sans-IO: two Connections talking through bytes."""

from __future__ import annotations

import pytest

from multifd_core.errors import WireError
from multifd_core.wire.connection import (
    NEED_DATA,
    Accept,
    Connection,
    Done,
    Probe,
    ProbeEnd,
    ProbeResult,
    Refuse,
    Result,
    Role,
    Round,
    State,
)
from multifd_core.wire.protocol import Hello, Offer

PS = 4096
HELLO = Hello(bytes(range(16)), PS, 2, [("pc.ram", 16 * PS), ("bios", PS)],
              [Offer("none", 0, "0.1")], None, None)
DIGESTS = {"pc.ram": "a" * 64, "bios": "b" * 64}


def pair() -> tuple[Connection, Connection]:
    return Connection(Role.SENDER), Connection(Role.RECEIVER, max_channels=8)


def deliver(src: Connection, dst: Connection, event: object, *, bytewise: bool = False):
    """``event`` from ``src`` to ``dst``; returns what ``dst`` makes of it."""
    data = src.send(event)  # type: ignore[arg-type]
    if bytewise:
        for i in range(len(data) - 1):
            dst.receive_data(data[i : i + 1])
            assert dst.next_event() is NEED_DATA
        dst.receive_data(data[-1:])
    else:
        dst.receive_data(data)
    got = dst.next_event()
    assert dst.next_event() is NEED_DATA
    return got


def test_a_whole_session_in_order() -> None:
    s, r = pair()
    assert deliver(s, r, Probe(1000)) == Probe(1000)
    assert deliver(s, r, ProbeEnd()) == ProbeEnd()
    assert r.state is State.PROBING and s.state is State.PROBING
    assert deliver(r, s, ProbeResult(1000, 0.5)) == ProbeResult(1000, 0.5)
    assert deliver(s, r, HELLO, bytewise=True) == HELLO
    side = {"method": "none", "level": None, "engine": "software", "kind": "software",
            "library": None, "library_version": None, "path": "native"}
    assert deliver(r, s, Accept("none", 0, side)) == Accept("none", 0, side)
    for n in range(3):
        assert deliver(s, r, Round(n)) == Round(n)
    assert deliver(s, r, Done(DIGESTS)) == Done(DIGESTS)
    assert deliver(r, s, Result(True)) == Result(True)
    assert s.state is State.CLOSED and r.state is State.CLOSED


@pytest.mark.parametrize("event", [Round(0), Done(DIGESTS), Accept("none", 0)])
def test_nothing_before_hello_but_probes(event: object) -> None:
    s, r = pair()
    with pytest.raises(WireError, match="out of turn"):
        (r if isinstance(event, Accept) else s).send(event)  # type: ignore[arg-type]


def test_the_peer_out_of_turn_is_refused_with_what_was_expected() -> None:
    s, r = pair()
    r.receive_data(Connection(Role.SENDER, ).send(HELLO))
    r.next_event()
    # A sender that skips ACCEPT and sends ROUND.
    rogue = Connection(Role.SENDER)
    rogue.state = State.TRANSFERRING
    r.receive_data(rogue.send(Round(0)))
    with pytest.raises(WireError) as err:
        r.next_event()
    assert err.value.field == "type" and err.value.received == "ROUND"
    assert "nothing from the sender" in str(err.value.expected)


@pytest.mark.parametrize("numbers", [[1], [0, 0], [0, 2]])
def test_rounds_in_order_only(numbers: list[int]) -> None:
    s, r = pair()
    deliver(s, r, HELLO)
    deliver(r, s, Accept("none", 0))
    rogue = Connection(Role.SENDER)
    rogue.state = State.TRANSFERRING
    with pytest.raises(WireError, match="round marker out of order"):
        for n in numbers:
            rogue.rounds = n
            r.receive_data(rogue.send(Round(n)))
            assert r.next_event() == Round(n)


def test_done_needs_a_digest_for_every_declared_block() -> None:
    s, r = pair()
    deliver(s, r, HELLO)
    deliver(r, s, Accept("none", 0))
    with pytest.raises(WireError, match="bad digest for ramblock bios"):
        deliver(s, r, Done({"pc.ram": "a" * 64}))


def test_refuse_ends_the_conversation() -> None:
    s, r = pair()
    deliver(s, r, HELLO)
    assert deliver(r, s, Refuse("no", "zstd")) == Refuse("no", "zstd")
    assert s.state is State.CLOSED
    with pytest.raises(WireError, match="out of turn"):
        s.send(Round(0))


def test_a_failed_result_may_come_mid_transfer() -> None:
    s, r = pair()
    deliver(s, r, HELLO)
    deliver(r, s, Accept("none", 0))
    deliver(s, r, Round(0))
    got = deliver(r, s, Result(False, "error", "channel 1: broken"))
    assert got == Result(False, "error", "channel 1: broken") and s.state is State.CLOSED


def test_hello_is_checked_with_the_receivers_limits() -> None:
    s = Connection(Role.SENDER)
    r = Connection(Role.RECEIVER, max_channels=1)
    with pytest.raises(WireError, match="channel count out of range"):
        deliver(s, r, HELLO)


def test_the_probe_is_bounded() -> None:
    from multifd_core.wire.protocol import MAX_PROBE_BYTES

    s, r = pair()
    r.probe_bytes = MAX_PROBE_BYTES
    with pytest.raises(WireError, match="link probe too long"):
        deliver(s, r, Probe(1))


def test_an_older_peer_without_optional_fields() -> None:
    s, r = pair()
    deliver(s, r, HELLO)
    assert deliver(r, s, Accept("none", 0)).engine is None
