"""The pluggy hook specification of a multifd method: QEMU's ``MultiFDMethods`` table.

A method plugin is a module registered under the ``multifd.methods`` entry-point group. It
implements ``multifd_register_methods`` and calls ``register(MethodClass)`` for each method it
provides. For a session, the engine instantiates the negotiated method and calls its six
per-channel hooks below through a plugin manager that holds that one method, so the choice is
resolved once per session and each call costs a few microseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from multifd_core.methods.context import ChannelContext, RecvPacket, SendPacket

PROJECT = "multifd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegistrationSpec:
    """Hooks a plugin module implements once, when it is loaded."""

    @hookspec
    def multifd_register_methods(self, register: Callable[[type], None]) -> None:
        """Call ``register(cls)`` for every ``multifd_core.Method`` subclass this plugin adds."""


class MethodSpec:
    """The six per-channel hooks; implemented as ``@hookimpl`` methods of a ``Method``."""

    @hookspec(firstresult=True)
    def send_setup(self, channel: ChannelContext) -> None:
        """Create the channel's persistent encode state in ``channel.state``."""

    @hookspec(firstresult=True)
    def send_prepare(self, channel: ChannelContext, packet: SendPacket) -> list[Any]:
        """Encode the packet's normal pages; return the payload as a list of buffers.

        Called only for packets with at least one normal page. The core sums the buffers'
        lengths into ``next_packet_size``, sets the method's flag bit and sends header and
        payload in one gather write.
        """

    @hookspec(firstresult=True)
    def send_cleanup(self, channel: ChannelContext) -> None:
        """Free ``channel.state``. Called once per channel, also after errors."""

    @hookspec(firstresult=True)
    def recv_setup(self, channel: ChannelContext) -> None:
        """Create the channel's persistent decode state in ``channel.state``."""

    @hookspec(firstresult=True)
    def recv(self, channel: ChannelContext, packet: RecvPacket) -> None:
        """Read the payload (``packet.read_payload()`` or ``packet.readinto_pages()``) and
        place exactly ``normal_pages`` decoded pages with ``packet.write_pages``.

        Called only for packets with at least one normal page, after the core has checked
        the header, the flags and the offsets and applied the zero pages. Raise
        ``MethodError`` for a payload that does not decode to exactly the expected size.
        """

    @hookspec(firstresult=True)
    def recv_cleanup(self, channel: ChannelContext) -> None:
        """Free ``channel.state``. Called once per channel, also after errors."""


def bind(method: Any) -> Any:
    """The hook caller for one session: a plugin manager holding only ``method``, so the
    negotiated method is resolved once and each call costs a few microseconds."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MethodSpec)
    pm.register(method)
    return pm.hook
