"""Drive a method's hooks directly, without sockets or threads (sans-IO).

``MethodHarness`` owns one sender-side and one receiver-side channel context per channel and
turns page arrays into payloads and back through the method's own hooks, exactly as the engine
calls them. Plugin tests and the conformance kit build on it.
"""

from __future__ import annotations

import numpy as np

from multifd_core.engine.pipeline import BufferSource, ChannelDecoder, ChannelEncoder
from multifd_core.engine.ram import RamBlock
from multifd_core.errors import MethodError
from multifd_core.methods.context import ChannelContext, SendPacket
from multifd_core.methods.method import Method
from multifd_core.wire import RamPacket


class MethodHarness:
    """Encode and decode packets with ``method_send`` and ``method_recv`` on ``channels``,
    through the engine's own channel pipeline (``ChannelEncoder``/``ChannelDecoder``)."""

    def __init__(self, method_send: Method, method_recv: Method | None = None,
                 channels: int = 1) -> None:
        self.send_method = method_send
        self.recv_method = method_recv or type(method_send)(method_send.options)
        self.page_size = method_send.page_size
        self.encoders = [ChannelEncoder(self.send_method, i, detect_zero=False)
                         for i in range(channels)]
        self.decoders = [ChannelDecoder(self.recv_method, i) for i in range(channels)]
        self._packet_num = 0
        for enc in self.encoders:
            enc.setup()
        for dec in self.decoders:
            dec.setup()

    @property
    def send_ctx(self) -> list[ChannelContext]:
        return [e.ctx for e in self.encoders]

    @property
    def recv_ctx(self) -> list[ChannelContext]:
        return [d.ctx for d in self.decoders]

    def encode(self, pages: np.ndarray, channel: int = 0) -> bytes:
        """The payload ``send_prepare`` produces for ``pages`` (``(n, page_size)`` uint8)."""
        pages = np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, self.page_size)
        encoder = self.encoders[channel]
        payload, _ = encoder.payload(SendPacket.whole(pages, encoder.scratch, "harness"))
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
        self._packet_num += 1
        index = np.arange(normal_pages, dtype=np.int64)
        pkt = RamPacket(flags=self.recv_method.code if flags is None else flags,
                        pages_alloc=normal_pages, normal_pages=normal_pages,
                        next_packet_size=len(payload), packet_num=self._packet_num,
                        zero_pages=0, ramblock=b"harness",
                        offsets=index.astype(np.uint64) * np.uint64(self.page_size))
        target = RamBlock("harness", out, page_size=self.page_size)
        self.decoders[channel].decode(pkt, BufferSource(bytes(payload)), target, index)
        return out

    def reset_receiver(self, channel: int = 0) -> None:
        """Give ``channel`` a fresh receive side (new decode state); the rest is kept, so
        many independent payloads cost one set-up each, not a whole harness."""
        self.decoders[channel].cleanup()
        self.decoders[channel] = ChannelDecoder(self.recv_method, channel)
        self.decoders[channel].setup()

    def roundtrip(self, pages: np.ndarray, channel: int = 0) -> np.ndarray:
        return self.decode(self.encode(pages, channel), len(pages), channel)

    def close(self) -> None:
        for enc in self.encoders:
            enc.cleanup()
        for dec in self.decoders:
            dec.cleanup()

    def __enter__(self) -> MethodHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
