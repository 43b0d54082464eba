"""The native main channel as a state machine, sans-IO (after h11): bytes in, events out;
events in, bytes out. No sockets, no clocks.

One ``Connection`` per end, built with its role. ``send(event)`` returns the bytes to write;
``receive_data(data)`` buffers what the peer wrote and ``next_event()`` returns the next
complete event or ``NEED_DATA``. Both check that the event is allowed now, for the side that
sends it, so neither end can be walked off the protocol:

    sender:   PROBE* PROBE_END -> (PROBE_RESULT)   ...   HELLO         ROUND(0) ROUND(1) ... DONE
    receiver:                                          ACCEPT|REFUSE                          RESULT

The link probe (raw PROBE frames, then PROBE_END, answered by PROBE_RESULT) may come before
HELLO, more than once. The receiver may end the conversation early with REFUSE (before or
instead of ACCEPT) or with a failed RESULT (any time after ACCEPT). Rounds are numbered from 0
in order; DONE carries a digest for every block HELLO declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from multifd_core.errors import WireError
from multifd_core.wire.protocol import (
    FRAME_LEN,
    MAX_PROBE_BYTES,
    Hello,
    Msg,
    decode_body,
    decode_frame,
    encode,
    encode_raw,
    parse_digests,
    parse_hello,
    parse_side,
)


class Role(Enum):
    SENDER = "sender"
    RECEIVER = "receiver"


class State(Enum):
    OPENING = "opening"  # before HELLO: link probes
    PROBING = "probing"  # PROBE_END sent, its PROBE_RESULT not yet
    NEGOTIATING = "negotiating"  # HELLO sent, ACCEPT or REFUSE not yet
    TRANSFERRING = "transferring"  # ROUNDs, then DONE
    VERIFYING = "verifying"  # DONE sent, RESULT not yet
    CLOSED = "closed"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Probe:
    """Raw filler of ``size`` bytes (the receiver times them: the I/O layer's job)."""

    size: int


@dataclass(frozen=True)
class ProbeEnd:
    pass


@dataclass(frozen=True)
class ProbeResult:
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Accept:
    method: str
    code: int
    engine: dict[str, Any] | None = None  # the receiver's engine (optional field)


@dataclass(frozen=True)
class Refuse:
    reason: str
    method: str | None = None  # the method the receiver requires (optional field)


@dataclass(frozen=True)
class Round:
    number: int


@dataclass(frozen=True)
class Done:
    digests: dict[str, str]
    engine: dict[str, Any] | None = None  # the sender's engine (optional field)


@dataclass(frozen=True)
class Result:
    ok: bool
    kind: str = ""  # "integrity" or "error" when not ok
    error: str = ""


Event = Probe | ProbeEnd | ProbeResult | Hello | Accept | Refuse | Round | Done | Result


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: ``next_event()``: the buffered bytes do not hold a whole frame yet.
NEED_DATA = _NeedData()

#: Which side may send which event, in which states.
_ALLOWED: dict[type, tuple[Role, frozenset[State]]] = {
    Probe: (Role.SENDER, frozenset({State.OPENING})),
    ProbeEnd: (Role.SENDER, frozenset({State.OPENING})),
    ProbeResult: (Role.RECEIVER, frozenset({State.PROBING})),
    Hello: (Role.SENDER, frozenset({State.OPENING})),
    Accept: (Role.RECEIVER, frozenset({State.NEGOTIATING})),
    Refuse: (Role.RECEIVER, frozenset({State.OPENING, State.PROBING, State.NEGOTIATING})),
    Round: (Role.SENDER, frozenset({State.TRANSFERRING})),
    Done: (Role.SENDER, frozenset({State.TRANSFERRING})),
    Result: (Role.RECEIVER, frozenset({State.TRANSFERRING, State.VERIFYING})),
}
_KIND = {Probe: Msg.PROBE, ProbeEnd: Msg.PROBE_END, ProbeResult: Msg.PROBE_RESULT,
         Hello: Msg.HELLO, Accept: Msg.ACCEPT, Refuse: Msg.REFUSE, Round: Msg.ROUND,
         Done: Msg.DONE, Result: Msg.RESULT}
_TYPE = {kind: cls for cls, kind in _KIND.items()}


class Connection:
    """One end of the native main channel (see the module docstring).

    A receiver checks the peer's HELLO against ``max_channels`` and ``max_total`` (bytes of
    RAM in all) and its probe against ``MAX_PROBE_BYTES``; every violation is a ``WireError``
    naming the field, the received and the expected value."""

    def __init__(self, role: Role, *, max_channels: int = 255, max_total: int = 1 << 44) -> None:
        self.role = role
        self.peer = Role.RECEIVER if role is Role.SENDER else Role.SENDER
        self.state = State.OPENING
        self.max_channels = max_channels
        self.max_total = max_total
        self.hello: Hello | None = None
        self.rounds = 0  # ROUND markers so far
        self.probe_bytes = 0
        self._buf = bytearray()

    # ------------------------------------------------------------------ our side

    def send(self, event: Event) -> bytes:
        """The frame for ``event``, after checking that this end may send it now."""
        self._advance(event, self.role)
        if isinstance(event, Probe):
            return encode_raw(Msg.PROBE, bytes(event.size))
        return encode(_KIND[type(event)], _body(event))

    def probe_frame(self, filler: bytes) -> bytes:
        """A PROBE frame with ``filler`` as its body (random bytes defeat compression on the
        way)."""
        return self.send(Probe(len(filler)))[:FRAME_LEN] + filler

    # ------------------------------------------------------------------ the peer's side

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def buffered(self) -> int:
        """Bytes of the peer's received but not yet returned as events."""
        return len(self._buf)

    def partial(self) -> str:
        """What of the frame being received has arrived, for messages."""
        have = len(self._buf)
        if have < FRAME_LEN:
            return f"after {have} of {FRAME_LEN} bytes of a message header"
        kind, length = decode_frame(self._buf[:FRAME_LEN])
        return f"after {have - FRAME_LEN} of {length} bytes of a {kind.name} message"

    def wanted(self) -> int:
        """Bytes still missing for the frame being received (at least 1)."""
        if len(self._buf) < FRAME_LEN:
            return FRAME_LEN - len(self._buf)
        _, length = decode_frame(self._buf[:FRAME_LEN])
        return max(FRAME_LEN + length - len(self._buf), 1)

    def next_event(self) -> Event | _NeedData:
        """The peer's next event, checked, or ``NEED_DATA``."""
        if len(self._buf) < FRAME_LEN:
            return NEED_DATA
        kind, length = decode_frame(self._buf[:FRAME_LEN])
        cls = _TYPE[kind]
        owner, states = _ALLOWED[cls]
        if owner is not self.peer or self.state not in states:
            raise WireError("unexpected session message", field="type", received=kind.name,
                            expected=self._expected())
        if len(self._buf) < FRAME_LEN + length:
            return NEED_DATA
        raw = bytes(self._buf[FRAME_LEN : FRAME_LEN + length])
        del self._buf[: FRAME_LEN + length]
        event = self._parse(cls, raw)
        self._advance(event, self.peer)
        return event

    # ------------------------------------------------------------------ internals

    def _parse(self, cls: type, raw: bytes) -> Event:
        if cls is Probe:
            return Probe(len(raw))
        body = decode_body(raw)
        if cls is Hello:
            return parse_hello(body, max_channels=self.max_channels, max_total=self.max_total)
        if cls is ProbeEnd:
            return ProbeEnd()
        if cls is ProbeResult:
            got, secs = body.get("bytes"), body.get("seconds")
            if not isinstance(got, int) or not isinstance(secs, (int, float)) or got <= 0 \
                    or isinstance(got, bool) or secs <= 0:
                raise WireError("bad probe result", field="PROBE_RESULT",
                                received=repr(body)[:80], expected="bytes > 0 and seconds > 0")
            return ProbeResult(got, float(secs))
        if cls is Accept:
            method, code = body.get("method"), body.get("code")
            if not isinstance(method, str) or not isinstance(code, int) or len(method) > 64:
                raise WireError("bad ACCEPT", field="method", received=repr(method)[:60],
                                expected="a method name and its code")
            return Accept(method, code, parse_side(body.get("engine"), "ACCEPT"))
        if cls is Refuse:
            method = body.get("method")
            return Refuse(str(body.get("reason", "?"))[:500],
                          method[:64] if isinstance(method, str) else None)
        if cls is Round:
            number = body.get("round")
            if number != self.rounds or isinstance(number, bool):
                raise WireError("round marker out of order", field="round",
                                received=repr(number)[:40], expected=self.rounds)
            return Round(number)
        if cls is Done:
            assert self.hello is not None
            return Done(parse_digests(body, [name for name, _ in self.hello.blocks]),
                        parse_side(body.get("engine"), "DONE"))
        ok = body.get("ok")
        return Result(ok is True, str(body.get("kind", ""))[:20],
                      str(body.get("error", ""))[:500])

    def _advance(self, event: Event, by: Role) -> None:
        owner, states = _ALLOWED[type(event)]
        if owner is not by or self.state not in states:
            raise WireError("session message out of turn", field="type",
                            received=f"{type(event).__name__} from the {by.value}",
                            expected=self._expected())
        if isinstance(event, Probe):
            self.probe_bytes += event.size
            if self.probe_bytes > MAX_PROBE_BYTES:
                raise WireError("link probe too long", field="PROBE", received=self.probe_bytes,
                                expected=f"<= {MAX_PROBE_BYTES} bytes")
        elif isinstance(event, ProbeEnd):
            self.state = State.PROBING
        elif isinstance(event, ProbeResult):
            self.state = State.OPENING
        elif isinstance(event, Hello):
            self.hello = event
            self.state = State.NEGOTIATING
        elif isinstance(event, Accept):
            self.state = State.TRANSFERRING
        elif isinstance(event, Round):
            if event.number != self.rounds:
                raise WireError("round marker out of order", field="round",
                                received=event.number, expected=self.rounds)
            self.rounds += 1
        elif isinstance(event, Done):
            self.state = State.VERIFYING
        else:  # Refuse, Result
            self.state = State.CLOSED

    def _expected(self) -> str:
        kinds = [_KIND[cls].name for cls, (owner, states) in _ALLOWED.items()
                 if owner is self.peer and self.state in states]
        return " or ".join(kinds) or (f"nothing from the {self.peer.value} "
                                      f"(state {self.state.value})")


def _body(event: Event) -> dict[str, Any]:
    if isinstance(event, Hello):
        return event.to_body()
    if isinstance(event, ProbeEnd):
        return {}
    if isinstance(event, ProbeResult):
        return {"bytes": event.bytes, "seconds": event.seconds}
    if isinstance(event, Accept):
        return {"method": event.method, "code": event.code,
                **({"engine": event.engine} if event.engine is not None else {})}
    if isinstance(event, Refuse):
        return {"reason": event.reason,
                **({"method": event.method} if event.method is not None else {})}
    if isinstance(event, Round):
        return {"round": event.number}
    if isinstance(event, Done):
        return {"digests": event.digests,
                **({"engine": event.engine} if event.engine is not None else {})}
    assert isinstance(event, Result)
    return {"ok": event.ok, **({"kind": event.kind, "error": event.error} if not event.ok
                               else {})}
