"""What the method hooks see: a channel's context and the packet being sent or received."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from multifd_core.errors import MethodError
from multifd_core.wire.pages import page_runs


@dataclass
class ChannelContext:
    """One channel of one session. ``state`` belongs to the method (streams, native jobs)."""

    id: int
    page_size: int
    state: Any = None
    _buffer: bytearray = field(default_factory=bytearray, repr=False)

    def buffer(self, size: int) -> memoryview:
        """A writable scratch buffer of ``size`` bytes, reused packet after packet (grown
        when needed): decode into it, then ``packet.write_pages`` it."""
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def close_state(self) -> None:
        """Close the method's state (anything with ``close()``) and forget it."""
        state, self.state = self.state, None
        if state is not None:
            state.close()


@dataclass
class ChannelStats:
    """What one channel moved: data and SYNC packets, pages, payload and wire bytes."""

    packets: int = 0
    sync_packets: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    max_packet_num: int = 0
    #: CPU seconds the channel's thread spent, user and system (codec work included).
    user_seconds: float = 0.0
    system_seconds: float = 0.0


class SendPacket:
    """The normal (non-zero) pages of one packet, all from one RAM block.

    ``iovecs()`` gives zero-copy views of the runs of adjacent pages; ``data()`` gives one
    contiguous buffer (a view when the pages are adjacent, else a gathered copy into a
    per-channel scratch buffer); ``pages()`` gives a ``(normal_pages, page_size)`` uint8 array.
    """

    __slots__ = ("block_name", "normal_pages", "page_size", "_block_pages", "_index", "_runs",
                 "_scratch")

    def __init__(self, block_name: str, page_size: int, block_pages: np.ndarray,
                 index: np.ndarray, runs: list[memoryview],
                 scratch: Callable[[int], memoryview]) -> None:
        self.block_name = block_name
        self.page_size = page_size
        self.normal_pages = len(index)
        self._block_pages = block_pages
        self._index = index
        self._runs = runs
        self._scratch = scratch

    @classmethod
    def whole(cls, pages: np.ndarray, scratch: Callable[[int], memoryview],
              block_name: str = "pages") -> SendPacket:
        """Every page of ``pages`` (``(n, page_size)`` uint8, contiguous) as one packet."""
        n, ps = pages.shape
        index = np.arange(n, dtype=np.int64)
        return cls(block_name, ps, pages, index, page_runs(pages.reshape(-1), index, ps),
                   scratch)

    def iovecs(self) -> list[memoryview]:
        return self._runs

    def data(self) -> memoryview:
        if len(self._runs) == 1:
            return self._runs[0]
        out = self._scratch(self.normal_pages * self.page_size)
        np.take(self._block_pages, self._index, axis=0,
                out=np.frombuffer(out, dtype=np.uint8).reshape(self.normal_pages, self.page_size))
        return out

    def pages(self) -> np.ndarray:
        if len(self._runs) == 1:
            first = int(self._index[0])
            return self._block_pages[first : first + self.normal_pages]
        return self._block_pages[self._index]


class PayloadSource(Protocol):
    """Where a received packet's payload comes from: a channel's socket (the engine), or a
    buffer (the harness, the conformance kit, benchmarks)."""

    def read(self, size: int) -> memoryview:
        """Exactly ``size`` bytes (a reused buffer: valid until the next read)."""

    def readinto(self, views: list[memoryview], total: int) -> None:
        """Exactly ``total`` bytes, scattered into ``views`` in order."""


class PageTarget(Protocol):
    """Where a received packet's pages go: a ``RamBlock``, or a test's sink."""

    def write_pages(self, index: np.ndarray, data: Any) -> None:
        """Store ``len(index)`` pages of ``data`` at page numbers ``index``."""

    def page_views(self, index: np.ndarray) -> list[memoryview]:
        """Writable views covering pages ``index``, in that order (for a raw read)."""


class RecvPacket:
    """A received packet's normal pages, for the method's ``recv`` hook: the packet's fields,
    its payload's ``source`` and the pages ``index`` of its ``target`` it fills.

    ``read_payload()`` returns exactly ``next_packet_size`` bytes (a reused buffer: decode
    before the next packet); ``readinto_pages()`` reads ``normal_pages * page_size`` raw bytes
    straight into the destination pages; ``write_pages(buf)`` places decoded pages and checks
    their total size. The payload is read once, by one of the first two.
    """

    __slots__ = ("channel_id", "packet_num", "flags", "normal_pages", "next_packet_size",
                 "page_size", "source", "target", "index", "_consumed")

    def __init__(self, *, channel_id: int, packet_num: int, flags: int, normal_pages: int,
                 next_packet_size: int, page_size: int, source: PayloadSource,
                 target: PageTarget, index: np.ndarray) -> None:
        self.channel_id = channel_id
        self.packet_num = packet_num
        self.flags = flags
        self.normal_pages = normal_pages
        self.next_packet_size = next_packet_size
        self.page_size = page_size
        self.source = source
        self.target = target
        self.index = index
        self._consumed = False

    @property
    def expected_size(self) -> int:
        """Decoded bytes this packet must yield: normal_pages x page_size."""
        return self.normal_pages * self.page_size

    @property
    def consumed(self) -> bool:
        """Whether the payload has been read."""
        return self._consumed

    def read_payload(self) -> memoryview:
        self._take()
        return self.source.read(self.next_packet_size)

    def readinto_pages(self) -> None:
        if self.next_packet_size != self.expected_size:
            # Reading normal_pages x page_size bytes of a payload of another size would
            # leave the channel inside a packet: refuse here, not at the next header.
            raise self.size_error(self.next_packet_size, "next_packet_size")
        self._take()
        if getattr(self.target, "writes_by_copy", False):
            # A file's pages: stored through the page cache in one call per run (a receive
            # straight into its mapping would fault every page in).
            self.target.write_pages(self.index, self.source.read(self.expected_size))
            return
        self.source.readinto(self.target.page_views(self.index), self.expected_size)

    def write_pages(self, data: Any) -> None:
        size = memoryview(data).nbytes
        if size != self.expected_size:
            raise self.size_error(size)
        self.target.write_pages(self.index, data)

    def size_error(self, received: int, field: str = "decoded_size") -> MethodError:
        return MethodError(
            f"multifd {self.channel_id}: packet size received {received} size expected "
            f"{self.expected_size} (packet {self.packet_num})",
            field=field, received=received, expected=self.expected_size,
            channel=self.channel_id)

    def check_consumed(self, method: str) -> None:
        """After ``recv``: the method must have read the payload, or the channel's next
        header would be read from inside it (a confusing magic error one packet late)."""
        if not self._consumed:
            raise MethodError(
                f"multifd {self.channel_id}: method {method} returned from recv without "
                f"reading the payload of packet {self.packet_num} ({self.next_packet_size} "
                "bytes)", field="payload", received="unread", expected="read by recv",
                channel=self.channel_id)

    def _take(self) -> None:
        if self._consumed:
            raise MethodError("the payload of a packet can be read only once",
                              field="payload", received="a second read", expected="one read")
        self._consumed = True
