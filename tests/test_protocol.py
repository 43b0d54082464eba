"""The native session protocol: frames, HELLO validation and method negotiation (sans-IO)."""

from __future__ import annotations

import pytest

from multifd_core.errors import NegotiationError, WireError
from multifd_core.methods.registry import MethodRegistry
from multifd_core.session.negotiate import negotiate_method
from multifd_core.wire.protocol import (
    FRAME_LEN,
    Hello,
    Msg,
    Offer,
    decode_body,
    decode_frame,
    encode,
    parse_hello,
)


def hello_body(**kw) -> dict:
    body = Hello(bytes(16), 4096, 2, [("pc.ram", 1 << 20)], [Offer("none", 0, "0.1")]).to_body()
    body.update(kw)
    return body


def test_frame_round_trip() -> None:
    raw = encode(Msg.ROUND, {"round": 3})
    kind, length = decode_frame(raw[:FRAME_LEN])
    assert kind is Msg.ROUND and decode_body(raw[FRAME_LEN:FRAME_LEN + length]) == {"round": 3}
    hello = parse_hello(hello_body())
    assert hello.channels == 2 and hello.blocks == [("pc.ram", 1 << 20)]


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (b"XXXX\0\x01\0\x01\0\0\0\0", "magic"),
        (b"MFDS\0\x09\0\x01\0\0\0\0", "version"),
        (b"MFDS\0\x01\0\x63\0\0\0\0", "type"),
        (b"MFDS\0\x01\0\x01\x7f\0\0\0", "length"),
    ],
)
def test_bad_frames(header: bytes, field: str) -> None:
    with pytest.raises(WireError) as err:
        decode_frame(header)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"uuid": "zz"}, "uuid"),
        ({"page_size": 3000}, "page_size"),
        ({"channels": 0}, "channels"),
        ({"channels": 256}, "channels"),
        ({"channels": True}, "channels"),
        ({"blocks": []}, "blocks"),
        ({"blocks": [{"name": "a", "length": 4097}]}, "blocks.length"),
        ({"blocks": [{"name": "a", "length": 4096}, {"name": "a", "length": 4096}]},
         "blocks.name"),
        ({"blocks": [{"name": "x" * 256, "length": 4096}]}, "blocks.name"),
        ({"blocks": [{"name": "a", "length": 1 << 50}]}, "blocks"),
        ({"offers": "none"}, "offers"),
        ({"level": "high"}, "level"),
    ],
)
def test_hello_validation(change: dict, field: str) -> None:
    with pytest.raises(WireError) as err:
        parse_hello(hello_body(**change))
    assert err.value.field == field


def test_body_must_be_a_json_object() -> None:
    with pytest.raises(WireError, match="not valid JSON"):
        decode_body(b"{")
    with pytest.raises(WireError, match="not a JSON object"):
        decode_body(b"[1]")


def test_negotiation() -> None:
    reg = MethodRegistry(entry_points=False)
    hello = parse_hello(hello_body(offers=[{"name": "zstd", "code": 4, "version": "1"},
                                           {"name": "none", "code": 0, "version": "1"}]))
    assert negotiate_method(hello, reg, None) == "none"  # first offer the receiver can decode
    with pytest.raises(NegotiationError, match="sender requires method zstd, which the "
                                               "receiver does not have .*pip install "
                                               "multifd-zstd"):
        negotiate_method(parse_hello({**hello_body(), "method": "zstd",
                                   "offers": [{"name": "zstd", "code": 4}]}), reg, None)
    with pytest.raises(NegotiationError, match="receiver requires method qpl; the sender "
                                               "offers none: install it on the sender"):
        negotiate_method(parse_hello(hello_body()), reg, "qpl")
    with pytest.raises(NegotiationError, match="sender requires method none, receiver "
                                               "requires zlib"):
        negotiate_method(parse_hello(hello_body(method="none")), reg, "zlib")
    with pytest.raises(NegotiationError, match="code 0x02 on the sender and 0x00"):
        negotiate_method(parse_hello(hello_body(offers=[{"name": "none", "code": 2}])), reg, None)


def test_link_probe_is_bounded_and_answered() -> None:
    """A receiver answers PROBE_END with what it timed, and refuses an endless probe."""
    import threading

    from multifd_core.engine.ram import RamBlock
    from multifd_core.session import ReceiveSession, probe_link
    from multifd_core.session.mainchannel import MainChannel
    from multifd_core.session.transport import Address, bound_address, connect, listen
    from multifd_core.wire import protocol
    from multifd_core.wire.connection import Connection, Role

    listener = listen(Address("tcp", host="127.0.0.1", port=0))
    addr = bound_address(listener, Address("tcp", host="127.0.0.1"))
    session = ReceiveSession(listener, lambda n, ln, ps: RamBlock.zeros(n, ln, page_size=ps),
                             timeout=10)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _serve(session, errors), daemon=True)
    t.start()
    main = connect(addr)
    main.settimeout(10)
    channel = MainChannel(main, Connection(Role.SENDER), timeout=10)
    assert probe_link(channel, seconds=0.05, max_bytes=4 << 20) > 0
    frame = protocol.encode_raw(Msg.PROBE, bytes(1 << 20))
    try:
        for _ in range(protocol.MAX_PROBE_BYTES // len(frame) + 50):  # past the bound
            main.sendall(frame)
    except OSError:
        pass
    t.join(20)
    main.close()
    listener.close()
    assert errors and "link probe too long" in str(errors[0])


def _serve(session, errors) -> None:
    try:
        session.serve()
    except BaseException as exc:
        errors.append(exc)
