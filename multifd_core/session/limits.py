"""Process limits a receiver checks before it commits to the numbers a peer sent."""

from __future__ import annotations

import os
import resource

from multifd_core.errors import MultiFDError, NegotiationError
from multifd_core.methods.method import Method
from multifd_core.wire import ram_packet_len

#: Default cap on a receiver's buffers and decoder state over all channels: 1 GiB.
DEFAULT_MAX_MEMORY = 1 << 30
#: Default cap on the RAM a sender may declare (the sum of its blocks' lengths): 1 TiB.
DEFAULT_MAX_RAM = 1 << 40

#: Descriptors kept free for listeners, selectors, pipes and libraries.
FD_RESERVE = 32


def open_files() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return 0


def ensure_open_files(needed: int, what: str) -> None:
    """Make room for ``needed`` more descriptors: raise the soft ``RLIMIT_NOFILE`` towards the
    hard one if it is too low; a ``MultiFDError`` names the numbers if even that is not
    enough."""
    want = open_files() + needed + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want <= soft:
        return
    if hard == resource.RLIM_INFINITY or want <= hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return
        except (ValueError, OSError):
            pass
    raise MultiFDError(f"{what} needs {needed} more open files, {want} in all, but the limit "
                       f"is {soft} (hard {hard}): raise it with ulimit -n")


def check_receive_memory(method: Method, channels: int, max_memory: int) -> None:
    """Refuse ``channels`` receiving channels of ``method`` if their buffers and decoder
    state (``Method.recv_memory`` plus the packet buffer, per channel) could exceed
    ``max_memory`` bytes."""
    per_channel = ram_packet_len(method.page_size) + method.recv_memory()
    need = channels * per_channel
    if need > max_memory:
        raise NegotiationError(
            f"{channels} channels of {method.name} need up to {need >> 20} MiB of receive "
            f"memory ({per_channel >> 10} KiB each), more than --max-memory "
            f"{max_memory >> 20} MiB: use fewer channels or raise --max-memory")
