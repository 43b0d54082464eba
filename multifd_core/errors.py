"""The project's error types. Every error a user or a peer can cause derives from MultiFDError."""

from __future__ import annotations

import errno
from typing import Any


class MultiFDError(Exception):
    """A failure with a message fit for a user: the CLI prints it as one line, no traceback."""


class WireError(MultiFDError):
    """A packet or handshake that breaks the wire format or a receiver check.

    ``field``, ``received`` and ``expected`` name what was wrong; the message keeps QEMU's text
    where QEMU has one, so logs from both sides read alike.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        received: Any = None,
        expected: Any = None,
        channel: int | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.received = received
        self.expected = expected
        self.channel = channel
        super().__init__(self._render())

    def _render(self) -> str:
        text = self.message
        if self.channel is not None:
            text = f"channel {self.channel}: {text}"
        if self.field is not None:
            text += f" [field {self.field}: received {self.received!s}, expected {self.expected!s}]"
        return text

    def on_channel(self, channel: int) -> WireError:
        """The same error, attributed to ``channel``."""
        if self.channel is None:
            self.channel = channel
            self.args = (self._render(),)
        return self


class MethodError(WireError):
    """A method's payload could not be encoded or decoded (corrupt, short, oversized)."""


class NegotiationError(MultiFDError):
    """The two ends could not agree on a session (method, page size, blocks, version)."""


class UnknownMethodError(MultiFDError):
    """A method name that no installed plugin provides."""


class PluginError(MultiFDError):
    """A method plugin that failed to load or declared itself wrongly."""


class TransportError(MultiFDError):
    """An address that cannot be used, a connection lost, a peer that timed out."""


class IntegrityError(MultiFDError):
    """The end-to-end digest of a block did not match what the sender had."""


class LibraryNotFoundError(MultiFDError):
    """A native library a plugin binds is not installed or not loadable."""


def io_error(exc: OSError, what: str) -> MultiFDError:
    """A failed write as one line naming ``what``; a full disk says so plainly."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MultiFDError(f"no space left on the device while writing {what}")
    return MultiFDError(f"cannot write {what}: {exc.strerror or exc}")


class UsageError(MultiFDError):
    """A command-line value that cannot work (the CLI exits 2, as for argparse's errors)."""
