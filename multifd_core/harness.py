"""Drive a method's hooks directly, without sockets or threads (sans-IO).

``MethodHarness`` owns one sender-side and one receiver-side channel context per channel and
turns page arrays into payloads and back through the method's own hooks, exactly as the engine
calls them. Plugin tests and the conformance kit build on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from multifd_core.context import ChannelContext, RecvPacket, SendPacket
from multifd_core.errors import MethodError
from multifd_core.method import Method
from multifd_core.pages import page_runs
from multifd_core.registry import bind


class MethodHarness:
    """Encode and decode packets with ``method_send`` and ``method_recv`` on ``channels``."""

    def __init__(self, method_send: Method, method_recv: Method | None = None,
                 channels: int = 1) -> None:
        self.send_method = method_send
        self.recv_method = method_recv or type(method_send)(method_send.options)
        self.page_size = method_send.page_size
        self._send = bind(self.send_method)
        self._recv = bind(self.recv_method)
        self.send_ctx = [ChannelContext(i, self.page_size) for i in range(channels)]
        self.recv_ctx = [ChannelContext(i, self.page_size) for i in range(channels)]
        self._packet_num = 0
        for ctx in self.send_ctx:
            self._send.send_setup(channel=ctx)
        for ctx in self.recv_ctx:
            self._recv.recv_setup(channel=ctx)

    def encode(self, pages: np.ndarray, channel: int = 0) -> bytes:
        """The payload ``send_prepare`` produces for ``pages`` (``(n, page_size)`` uint8)."""
        pages = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, self.page_size)
        index = np.arange(len(pages), dtype=np.int64)
        runs = page_runs(pages.reshape(-1), index, self.page_size)
        scratch: dict[str, bytearray] = {}

        def get_scratch(n: int) -> memoryview:
            buf = scratch.get("b")
            if buf is None or len(buf) < n:
                buf = scratch["b"] = bytearray(n)
            return memoryview(buf)[:n]

        packet = SendPacket("harness", self.page_size, pages, index, runs, get_scratch)
        payload = self._send.send_prepare(channel=self.send_ctx[channel], packet=packet)
        return b"".join(bytes(p) for p in payload)

    def decode(self, payload: bytes | memoryview, normal_pages: int, channel: int = 0,
               flags: int | None = None, max_payload: int | None = None) -> np.ndarray:
        """The pages ``recv`` produces from ``payload``; errors propagate as ``MethodError``."""
        bound = self.recv_method.max_payload(normal_pages) if max_payload is None else max_payload
        if len(payload) > bound:
            raise MethodError("multifd: received unexpectedly large packet",
                              field="next_packet_size", received=len(payload),
                              expected=f"<= {bound}", channel=channel)
        out = np.zeros((normal_pages, self.page_size), dtype=np.uint8)
        data = memoryview(bytes(payload))
        written: list[bool] = []
        self._packet_num += 1

        def read(n: int) -> memoryview:
            return data[:n]

        def readinto_pages() -> None:  # RecvPacket checked the payload is out's size
            out.reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)

        def write(buf: Any) -> None:
            out.reshape(-1)[:] = np.frombuffer(buf, dtype=np.uint8)
            written.append(True)

        packet = RecvPacket(channel_id=channel, packet_num=self._packet_num,
                            flags=self.recv_method.code if flags is None else flags,
                            normal_pages=normal_pages, next_packet_size=len(payload),
                            page_size=self.page_size, read=read,
                            readinto_pages=readinto_pages, write=write)
        self._recv.recv(channel=self.recv_ctx[channel], packet=packet)
        packet.check_consumed(self.recv_method.name)
        return out

    def reset_receiver(self, channel: int = 0) -> None:
        """Give ``channel`` a fresh receive side (new decode state); the rest is kept, so
        many independent payloads cost one set-up each, not a whole harness."""
        self._recv.recv_cleanup(channel=self.recv_ctx[channel])
        self.recv_ctx[channel] = ChannelContext(channel, self.page_size)
        self._recv.recv_setup(channel=self.recv_ctx[channel])

    def roundtrip(self, pages: np.ndarray, channel: int = 0) -> np.ndarray:
        return self.decode(self.encode(pages, channel), len(pages), channel)

    def close(self) -> None:
        for ctx in self.send_ctx:
            self._send.send_cleanup(channel=ctx)
        for ctx in self.recv_ctx:
            self._recv.recv_cleanup(channel=ctx)

    def __enter__(self) -> MethodHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

