"""What both engines agree on: the frame settings and the payload bound."""

from __future__ import annotations

#: LZ4F_max64KB: 64 KiB blocks (a packet of 128 x 4 KiB pages is 8 blocks).
BLOCK_SIZE_ID = 4
BLOCK_SIZE = 64 * 1024
#: magic 4 + FLG/BD 2 + content size 8 + dict id 4 + header checksum 1.
FRAME_HEADER_MAX = 19
#: Per block: a 4-byte size word and a 4-byte xxh32 block checksum.
BLOCK_OVERHEAD = 8


def payload_bound(size: int) -> int:
    """The largest payload for ``size`` page bytes: a block that does not shrink is stored
    raw, so each block costs at most 8 bytes more than its data, plus the frame header."""
    return FRAME_HEADER_MAX + size + BLOCK_OVERHEAD * (size // BLOCK_SIZE + 2)
