"""What a finished native session measured, on either end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from multifd_core.methods.context import ChannelStats


@dataclass
class SessionStats:
    """What a finished session measured (either end)."""

    method: str
    channels: int
    seconds: float
    transfer_seconds: float
    ram_bytes: int
    wire_bytes: int
    payload_bytes: int
    normal_pages: int
    zero_pages: int
    packets_per_channel: list[int]
    rounds: int
    digests: dict[str, str] = field(default_factory=dict)
    #: The algorithm of ``digests`` (``engine.digest``).
    digest_algorithm: str = "sha256"
    page_size: int = 4096
    auto: dict[str, Any] | None = None
    #: Each side's engine description (``report.describe``); None when a peer did not say.
    sender: dict[str, Any] | None = None
    receiver: dict[str, Any] | None = None
    #: Seconds per phase of this end (``report.Phases``).
    phases: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of this end's channel threads (the engine and the codec), user and system.
    channel_cpu: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def of_channels(cls, per_channel: Sequence[ChannelStats], **kw: Any) -> SessionStats:
        """Totals over the channels' stats; the other fields as keywords."""
        return cls(channel_cpu=(round(sum(c.user_seconds for c in per_channel), 3),
                                round(sum(c.system_seconds for c in per_channel), 3)),
                   wire_bytes=sum(c.wire_bytes for c in per_channel),
                   payload_bytes=sum(c.payload_bytes for c in per_channel),
                   normal_pages=sum(c.normal_pages for c in per_channel),
                   zero_pages=sum(c.zero_pages for c in per_channel),
                   packets_per_channel=[c.packets + c.sync_packets for c in per_channel], **kw)

    @property
    def throughput(self) -> float:
        """RAM bytes per second of transfer."""
        return self.ram_bytes / self.transfer_seconds if self.transfer_seconds else 0.0

    @property
    def compression_ratio(self) -> float:
        """Bytes of normal pages divided by the payload bytes that carried them."""
        raw = self.normal_pages * self.page_size
        return raw / self.payload_bytes if self.payload_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "channels": self.channels,
            "seconds": round(self.seconds, 4), "transfer_seconds": round(self.transfer_seconds, 4),
            "ram_bytes": self.ram_bytes, "wire_bytes": self.wire_bytes,
            "payload_bytes": self.payload_bytes, "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages, "packets_per_channel": self.packets_per_channel,
            "rounds": self.rounds,
            "throughput_bytes_per_s": round(self.throughput),
            "compression_ratio": round(self.compression_ratio, 4),
            "engines": {"sender": self.sender, "receiver": self.receiver},
            "phases": self.phases,
            "channel_cpu": {"user": self.channel_cpu[0], "system": self.channel_cpu[1]},
            **({"auto": self.auto} if self.auto is not None else {}),
        }
