"""Native sessions between our own endpoints, and what they stand on: the sending end
(``send``), the receiving end (``receive``), the main channel's I/O (``mainchannel``) over the
sans-IO ``wire.connection``, negotiation (``negotiate``), the ``auto`` method chooser, block
digests (``digests``), addresses and TLS (``transport``), the output directory (``outdir``),
process limits (``limits``), reports (``report``, ``stats``)."""

from multifd_core.session.limits import DEFAULT_MAX_MEMORY
from multifd_core.session.outdir import PARTIAL, FileOutput, block_file_name
from multifd_core.session.receive import (
    DEFAULT_MAX_RAM,
    HANDSHAKE_TIMEOUT,
    Allocator,
    ReceiveSession,
)
from multifd_core.session.send import AUTO, RoundPlan, probe_link, send_session
from multifd_core.session.stats import SessionStats

#: A round: page numbers to send per block name (the name 0.1 used).
Round = RoundPlan

__all__ = [
    "AUTO", "DEFAULT_MAX_MEMORY", "DEFAULT_MAX_RAM", "HANDSHAKE_TIMEOUT", "PARTIAL",
    "Allocator", "FileOutput", "ReceiveSession", "Round", "RoundPlan", "SessionStats",
    "block_file_name", "probe_link", "send_session",
]
