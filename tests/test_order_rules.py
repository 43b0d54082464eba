"""The native session's order rules, over real sockets with a scripted sender: ROUND markers
come in order, and every channel sends exactly one SYNC per round. A sender that breaks them
fails the session at once with an error naming the channel, the round and what was expected;
the session timeout is a minute, so none of these may end by a stall timeout."""

from __future__ import annotations

import socket

import pytest
from netkit import PS, RawSender, Served, frame, read_msg

from multifd_core import wire
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import WireError
from multifd_core.wire import protocol
from multifd_core.wire.protocol import Msg

TIMEOUT = 60.0
BOUND = 20.0  # the test's own wait: far below TIMEOUT
BLOCKS = [("ram", 4 * PS)]


def sync(num: int) -> bytes:
    return bytes(wire.encode_sync_packet(num, PS))


def start(channels: int) -> tuple[Served, RawSender]:
    served = Served({"timeout": TIMEOUT})
    return served, RawSender(served, channels=channels, blocks=BLOCKS)


def finish(served: Served, sender: RawSender) -> BaseException | None:
    """Channels end, DONE with the digest of the (all-zero) block; the session's outcome."""
    for ch in sender.channels:
        ch.shutdown(socket.SHUT_WR)
    digest = RamBlock.zeros("ram", 4 * PS).sha256()
    sender.main.sendall(protocol.encode(Msg.DONE, {"digests": {"ram": digest}}))
    err = served.wait(BOUND)
    sender.close()
    return err


def unpaired(err: BaseException | None, channel: int, n_rounds: int) -> bool:
    """The receiver's error for a SYNC no ROUND pairs with (rounds counted from 1)."""
    assert isinstance(err, WireError), err
    assert "a SYNC after the last round: nothing pairs with it" in str(err), err
    assert (err.channel, err.field, err.received) == (channel, "flags", "SYNC"), err
    assert err.expected == f"no SYNC after round {n_rounds}", err
    return True


def rounds(sender: RawSender, *markers: object) -> None:
    for m in markers:
        sender.main.sendall(protocol.encode(Msg.ROUND, {"round": m}))


def test_rules_kept_verify() -> None:
    """The control: two rounds, one SYNC per channel each."""
    served, sender = start(2)
    for ch in sender.channels:
        ch.sendall(sync(1) + sync(2))
    rounds(sender, 0, 1)
    assert finish(served, sender) is None
    assert served.session.stats.rounds == 2


@pytest.mark.parametrize(("markers", "received", "expected"), [
    ((1,), 1, 0), ((0, 0), 0, 1), ((0, 2), 2, 1), (("0",), "'0'", 0), ((None,), None, 0)])
def test_round_markers_out_of_order(markers: tuple[object, ...], received: object,
                                    expected: int) -> None:
    served, sender = start(2)
    for ch in sender.channels:
        ch.sendall(sync(1))
    rounds(sender, *markers)
    err = served.wait(BOUND)
    sender.close()
    assert isinstance(err, WireError) and "round marker out of order" in str(err), err
    assert (err.field, err.received, err.expected) == ("round", str(received), expected)


def test_a_round_marker_without_a_body_round() -> None:
    served, sender = start(1)
    sender.channels[0].sendall(sync(1))
    sender.main.sendall(frame(Msg.ROUND, b"{}"))
    err = served.wait(BOUND)
    sender.close()
    assert isinstance(err, WireError) and err.field == "round", err


def test_two_syncs_in_one_round() -> None:
    served, sender = start(2)
    sender.channels[0].sendall(sync(1) + sync(2))
    sender.channels[1].sendall(sync(3))
    rounds(sender, 0)
    err = finish(served, sender)
    assert unpaired(err, 0, 1)


def test_a_sync_with_no_round_after_it() -> None:
    served, sender = start(1)
    sender.channels[0].sendall(sync(1))
    assert unpaired(finish(served, sender), 0, 0)


def test_an_extra_sync_early_is_found_by_the_end() -> None:
    """Channel 0 sends two SYNCs in round 0 and one in round 1: its extra SYNC passes for
    round 1's, so the count is one over when DONE comes."""
    served, sender = start(2)
    sender.channels[0].sendall(sync(1) + sync(2) + sync(5))
    sender.channels[1].sendall(sync(3) + sync(4))
    rounds(sender, 0, 1)
    assert unpaired(finish(served, sender), 0, 2)


@pytest.mark.parametrize("n_rounds", [1, 2])
def test_a_channel_that_ends_without_its_sync(n_rounds: int) -> None:
    """Channel 1 sends one SYNC fewer than there are rounds, then ends: the round that waits
    for it fails at once. (Which round it skipped cannot be told: its SYNCs count in order.)"""
    served, sender = start(2)
    sender.channels[0].sendall(b"".join(sync(i) for i in range(n_rounds)))
    sender.channels[1].sendall(b"".join(sync(10 + i) for i in range(n_rounds - 1)))
    sender.channels[1].shutdown(socket.SHUT_WR)
    rounds(sender, *range(n_rounds))
    err = served.wait(BOUND)
    sender.close()
    assert isinstance(err, WireError) and (err.channel, err.field) == (1, "flags"), err
    assert f"the channel ended without its SYNC for round {n_rounds}" in str(err), err
    assert (err.received, err.expected) == ("end of stream", f"a SYNC for round {n_rounds}")


def test_the_sender_hears_why() -> None:
    """The refused sender gets RESULT with the receiver's reason on the main channel."""
    served, sender = start(1)
    sender.channels[0].sendall(sync(1) + sync(2))
    rounds(sender, 0)
    sender.channels[0].shutdown(socket.SHUT_WR)
    sender.main.sendall(protocol.encode(Msg.DONE, {"digests": {"ram": "0" * 64}}))
    kind, body = read_msg(sender.main)
    assert kind is Msg.RESULT and body["ok"] is False
    assert "a SYNC after the last round" in body["error"], body
    assert isinstance(served.wait(BOUND), WireError)
    sender.close()
