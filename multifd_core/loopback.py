"""A full native session between our sender and our receiver over loopback TCP, in-process.

For tests and plugin authors: real sockets, real threads, the real handshake and digests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from multifd_core.engine.ram import RamBlock
from multifd_core.methods.registry import MethodRegistry
from multifd_core.session import ReceiveSession, Round, SessionStats, send_session
from multifd_core.session.transport import Address, bound_address, listen


def migrate(
    src_blocks: list[RamBlock],
    *,
    method: str = "none",
    channels: int = 2,
    level: int | None = None,
    engine: str | None = None,
    rounds: list[Round] | None = None,
    before_round: Callable[[int], None] | None = None,
    timeout: float = 60.0,
    registry: MethodRegistry | None = None,
    receiver_method: str | None = None,
    dest_blocks: dict[str, RamBlock] | None = None,
    receiver_engine: str | None = None,
) -> tuple[list[RamBlock], SessionStats]:
    """Migrate ``src_blocks`` into fresh in-memory blocks (or ``dest_blocks`` by name).

    ``engine`` is the sender's engine, ``receiver_engine`` the receiver's (default: the best
    available there), so every engine pair of a method can be migrated."""
    listener = listen(Address("tcp", host="127.0.0.1", port=0))
    addr = bound_address(listener, Address("tcp", host="127.0.0.1"))

    def allocate(name: str, length: int, ps: int) -> RamBlock:
        if dest_blocks is not None and name in dest_blocks:
            return dest_blocks[name]
        return RamBlock.zeros(name, length, page_size=ps)

    session = ReceiveSession(listener, allocate, method=receiver_method, registry=registry,
                             timeout=timeout, fresh=dest_blocks is None,
                             engine=receiver_engine)
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            outcome["stats"] = session.serve()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=serve, name="multifd-loopback-recv", daemon=True)
    thread.start()
    try:
        stats = send_session(src_blocks, addr, method=method, channels=channels, level=level,
                             engine=engine, rounds=rounds, before_round=before_round,
                             registry=registry, timeout=timeout)
    except BaseException:
        thread.join(timeout)
        if "error" in outcome:
            raise outcome["error"] from None
        raise
    finally:
        thread.join(timeout)
        listener.close()
    if "error" in outcome:
        raise outcome["error"]
    return session.blocks, stats
