"""The wire layer, sans-IO: QEMU's multifd packets (``packets``, re-exported here), the native
main channel's frames and messages (``protocol``) and its state machine (``connection``), and
the vectorised page helpers the packets are built from (``pages``, ``packetizer``)."""

from multifd_core.wire.packets import *  # noqa: F403
from multifd_core.wire.packets import __all__  # noqa: F401
