"""Native sessions between our own endpoints, and what they stand on: the sending end
(``send``), the receiving end (``receive``), the main channel's I/O (``mainchannel``) over the
sans-IO ``wire.connection``, negotiation (``negotiate``), the ``auto`` method chooser, block
digests (``digests``), addresses and TLS (``transport``), the output directory (``outdir``),
process limits (``limits``), reports (``report``, ``stats``)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as type checkers see them; at run time they load on first use
    from multifd_core.session.limits import DEFAULT_MAX_MEMORY, DEFAULT_MAX_RAM
    from multifd_core.session.outdir import PARTIAL, FileOutput, block_file_name
    from multifd_core.session.receive import HANDSHAKE_TIMEOUT, Allocator, ReceiveSession
    from multifd_core.session.send import AUTO, RoundPlan, probe_link, send_session
    from multifd_core.session.stats import SessionStats

    Round = RoundPlan

#: Where each name lives: imported on first use, so that a command loads only the parts of
#: the package it runs (``qemu replay`` needs neither end of a native session).
_LAZY = {
    "AUTO": "send", "DEFAULT_MAX_MEMORY": "limits", "DEFAULT_MAX_RAM": "limits",
    "HANDSHAKE_TIMEOUT": "receive", "PARTIAL": "outdir", "Allocator": "receive",
    "FileOutput": "outdir", "ReceiveSession": "receive", "RoundPlan": "send",
    "SessionStats": "stats", "block_file_name": "outdir", "probe_link": "send",
    "send_session": "send",
}

__all__ = [
    "AUTO", "DEFAULT_MAX_MEMORY", "DEFAULT_MAX_RAM", "HANDSHAKE_TIMEOUT", "PARTIAL",
    "Allocator", "FileOutput", "ReceiveSession", "Round", "RoundPlan", "SessionStats",
    "block_file_name", "probe_link", "send_session",
]


def __getattr__(name: str) -> Any:
    # Round: a round, page numbers to send per block name (the name 0.1 used).
    real = "RoundPlan" if name == "Round" else name
    where = _LAZY.get(real)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{where}"), real)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
