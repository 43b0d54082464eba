"""The sending end of a native session: HELLO, the channels, rounds, DONE, the verdict."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from multifd_core.engine.digest import DEFAULT as DEFAULT_DIGEST
from multifd_core.engine.ram import RamBlock
from multifd_core.engine.sender import Sender
from multifd_core.errors import IntegrityError, MultiFDError, NegotiationError, TransportError
from multifd_core.methods.method import MethodOptions
from multifd_core.methods.registry import MethodRegistry, default_registry
from multifd_core.session.digests import digests
from multifd_core.session.mainchannel import MainChannel
from multifd_core.session.report import Phases, describe, log_channels, side_text
from multifd_core.session.stats import SessionStats
from multifd_core.session.transport import Address, connect, endpoints
from multifd_core.wire.connection import (
    Accept,
    Connection,
    Done,
    ProbeEnd,
    ProbeResult,
    Refuse,
    Result,
    Role,
    Round,
)
from multifd_core.wire.protocol import Hello, Offer

log = logging.getLogger("multifd.session")

#: A round: page numbers to send per block name (None: every page of the block).
RoundPlan = Mapping[str, "np.ndarray | None"]

#: ``method=AUTO``: measure the link, predict each method's time on a sample, offer the best.
AUTO = "auto"
#: How long, and how many bytes at most, the link probe pushes on the main channel.
PROBE_SECONDS = 0.3
PROBE_BYTES = 64 << 20


def probe_link(main: MainChannel, *, seconds: float = PROBE_SECONDS,
               max_bytes: int = PROBE_BYTES) -> float:
    """Bytes per second the receiver measured for raw PROBE frames pushed for ``seconds``."""
    filler = os.urandom(1 << 20)
    deadline = time.monotonic() + seconds
    sent = 0
    while sent < max_bytes and (sent == 0 or time.monotonic() < deadline):
        main.send_probe(filler)
        sent += len(filler)
    main.send(ProbeEnd())
    result = main.receive()
    if not isinstance(result, ProbeResult):
        raise NegotiationError(f"the receiver answered the link probe with "
                               f"{type(result).__name__}")
    return result.bytes / max(result.seconds, 1e-6)


def _auto_offers(main: MainChannel, blocks: list[RamBlock], registry: MethodRegistry,
                 offers: list[Offer], channels: int) -> tuple[list[Offer], dict[str, Any]]:
    """Measure the link, rank the methods by predicted time, and offer them in that order
    (the receiver takes the first it can decode)."""
    from multifd_core.session.auto import predict_best

    rate = probe_link(main)
    choice, report = predict_best(blocks, registry, channels, rate)
    # The choice first, then the others by predicted time (the fallback if the receiver
    # lacks the choice), then whatever could not be measured.
    rank = {c["method"]: i for i, c in reversed(list(enumerate(report["candidates"])))}
    rank[choice] = -1
    ordered = sorted(offers, key=lambda o: (o.name not in rank, rank.get(o.name, 0)))
    return ordered, report


class _EarlyDigests(threading.Thread):
    """The blocks' digests, computed alongside the transfer."""

    def __init__(self, blocks: list[RamBlock]) -> None:
        super().__init__(name="multifd-digest", daemon=True)
        self.blocks = blocks
        self._out: dict[str, str] | BaseException = {}
        self.start()

    def run(self) -> None:
        try:
            self._out = digests(self.blocks, threads=False)
        except BaseException as exc:
            self._out = exc

    def result(self) -> dict[str, str]:
        self.join()
        if isinstance(self._out, BaseException):
            raise self._out
        return self._out


def send_session(
    blocks: list[RamBlock],
    addr: Address,
    *,
    method: str | None = None,
    channels: int = 2,
    level: int | None = None,
    engine: str | None = None,
    rounds: list[RoundPlan] | None = None,
    before_round: Callable[[int], None] | None = None,
    registry: MethodRegistry | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 10.0,
    on_sender: Callable[[Sender], None] | None = None,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> SessionStats:
    """Migrate ``blocks`` to the receiver at ``addr``; return when it has verified them.

    With ``tls`` the main channel and every multifd channel run over TLS (the receiver's
    certificate is checked against ``tls_hostname``, by default the address's host).
    ``on_phase`` hears each phase: connecting, negotiating, transferring, verifying."""
    registry = registry or default_registry()
    if not blocks:
        raise MultiFDError("nothing to send: no ramblocks")
    page_size = blocks[0].page_size
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise MultiFDError(f"ramblock names must be unique: {names}")
    if not 1 <= channels <= 255:
        raise MultiFDError(f"--channels {channels} out of range 1..255")
    auto = method == AUTO
    if auto:
        method = None
        if level is not None or engine is not None:
            raise MultiFDError("--compression auto picks the level and engine itself")
    if method is not None:
        entry = registry.get(method)  # unknown method: error with the install hint
        entry.cls(MethodOptions(page_size=page_size, level=level, engine=engine))  # level
        candidates = [entry]  # the others are neither imported nor probed
    else:
        candidates = registry.entries()
    offers = [Offer(e.name, e.code, e.version) for e in candidates if e.cls.available()[0]]
    session_uuid = uuidlib.uuid4().bytes
    started = time.perf_counter()
    phases = Phases(log, on_phase)
    phases.enter("connecting")
    sock = connect(addr, timeout=connect_timeout, tls=tls, server_hostname=tls_hostname)
    main = MainChannel(sock, Connection(Role.SENDER), timeout=timeout)
    log.info("main channel connected to %s%s", addr, " (TLS)" if tls else "")
    socks: list[socket.socket] = []
    sender: Sender | None = None
    auto_report: dict[str, Any] | None = None
    try:
        phases.enter("negotiating")
        if auto:
            offers, auto_report = _auto_offers(main, blocks, registry, offers, channels)
            log.info("auto: link %.0f MB/s; chose %s", auto_report["link_bytes_per_s"] / 1e6,
                     auto_report["choice"])
        log.info("offering %s; %s", ", ".join(f"{o.name} ({o.code:#04x})" for o in offers),
                 f"requiring {method}" if method else "the receiver takes the first it can run")
        main.send(Hello(session_uuid, page_size, channels,
                        [(b.name, b.used_length) for b in blocks], offers, method, level,
                        DEFAULT_DIGEST))
        answer = main.receive()
        if isinstance(answer, Refuse):
            reason = answer.reason
            if answer.method and registry.excluded_plugin(answer.method):
                reason += (f"; here method {answer.method!r} is installed but excluded by "
                           f"MULTIFD_PLUGINS")
            raise NegotiationError(f"receiver refused the session: {reason}")
        assert isinstance(answer, Accept)
        chosen = answer.method
        if chosen not in registry or (method is not None and chosen != method):
            raise NegotiationError(f"receiver chose method {chosen[:60]!r}, which this "
                                   "sender did not offer")
        instance = registry.create(chosen, MethodOptions(page_size=page_size, level=level,
                                                         engine=engine))
        sender_side = describe(instance)
        log.info("receiver chose %s; its engine: %s", chosen, side_text(answer.engine))
        log.info("engine: %s", side_text(sender_side))
        for i in range(channels):
            socks.append(connect(addr, timeout=connect_timeout, tls=tls,
                                 server_hostname=tls_hostname))
            log.info("channel %d connected (%s)", i, endpoints(socks[-1]))
        phases.enter("transferring")
        transfer_start = time.perf_counter()
        # Blocks this process cannot write (a file mapped read-only) hash while they go out.
        early = _EarlyDigests(blocks) if not any(b.writable for b in blocks) else None
        sender = Sender(instance, socks, page_size=page_size, uuid=session_uuid,
                        timeout=timeout)
        if on_sender is not None:
            on_sender(sender)
        by_name = {b.name: b for b in blocks}
        plan = rounds or [dict.fromkeys(names)]
        for i, rnd in enumerate(plan):
            if before_round is not None:
                before_round(i)
            for name, index in rnd.items():
                if name not in by_name:
                    raise MultiFDError(f"round {i} names unknown ramblock {name}")
                sender.queue_pages(by_name[name], index)
            sender.sync()
            main.send(Round(i))
            log.info("round %d: %s queued, SYNC sent", i, ", ".join(
                f"{name} {by_name[name].n_pages if index is None else len(index)} pages"
                for name, index in rnd.items()))
        stats = sender.close()
        transfer = time.perf_counter() - transfer_start
        log_channels(log, stats.channels)
        phases.enter("verifying")
        ours = early.result() if early is not None else digests(blocks)
        main.send(Done(ours, sender_side))
        result = main.receive()
        assert isinstance(result, Result)
        if not result.ok:
            if result.kind == "integrity":
                raise IntegrityError(f"receiver reports: {result.error}")
            raise MultiFDError(f"receiver reports: {result.error}")
        return SessionStats.of_channels(
            stats.channels, method=chosen, channels=channels,
            seconds=time.perf_counter() - started, transfer_seconds=transfer,
            ram_bytes=sum(b.used_length for b in blocks), rounds=len(plan), digests=ours,
            digest_algorithm=DEFAULT_DIGEST,
            page_size=page_size, auto=auto_report, sender=sender_side, receiver=answer.engine,
            phases=phases.finish())
    except BaseException as exc:
        if sender is not None:
            sender.abort()
            if isinstance(exc, TransportError):
                reason = main.result_if_any()
                if isinstance(reason, Result) and not reason.ok:
                    raise TransportError(f"{exc}; receiver reports: {reason.error[:300]}"
                                         ) from None
        raise
    finally:
        for s in [sock, *socks]:
            try:
                s.close()
            except OSError:
                pass
