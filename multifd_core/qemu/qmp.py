"""A small synchronous QMP client: unix socket, one JSON object per line, events, timeouts."""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from multifd_core.errors import MultiFDError, TransportError


class QMPError(MultiFDError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error = error
        super().__init__(f"QMP {command}: {error.get('class', '?')}: {error.get('desc', error)}")


class QMPClient:
    """Talks to one QEMU monitor. Events read while waiting for a reply are kept in order."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: deque[dict[str, Any]] = deque()
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.greeting: dict[str, Any] = {}

    # ---------------------------------------------------------------- connection

    def connect(self, *, wait: float | None = None) -> QMPClient:
        """Connect (retrying until ``wait`` seconds pass), read the greeting, negotiate."""
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        while True:
            try:
                self._sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise TransportError(f"QMP socket {self.path}: {exc}") from None
                time.sleep(0.02)
        self.greeting = self._read_message(time.monotonic() + self.timeout)
        if "QMP" not in self.greeting:
            raise TransportError(f"QMP {self.path}: unexpected greeting {self.greeting!r}")
        self.execute("qmp_capabilities")
        return self

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- commands

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run ``command``; return its ``return`` value or raise QMPError."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read_message(deadline, what=command)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError(command, reply["error"])
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line})

    def wait_event(self, name: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
                   *, timeout: float | None = None) -> dict[str, Any]:
        """The first (kept or new) event ``name`` whose data satisfies ``predicate``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for ev in list(self.events):
                if ev["event"] == name and (predicate is None or predicate(ev.get("data", {}))):
                    self.events.remove(ev)
                    return ev
            msg = self._read_message(deadline, what=f"event {name}")
            if "event" in msg:
                self.events.append(msg)

    def wait_migration(self, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
                       *, timeout: float = 60.0, poll: float = 0.05) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``statuses``; return the reply."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            if info.get("status") in statuses:
                return info
            if time.monotonic() > deadline:
                raise TransportError(
                    f"QMP {self.path}: migration still {info.get('status')!r} after {timeout}s")
            time.sleep(poll)

    # ---------------------------------------------------------------- framing

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise TransportError(f"QMP {self.path}: send failed: {exc}") from None

    def _read_message(self, deadline: float, what: str = "reply") -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"QMP {self.path}: no {what} within the timeout "
                                     "(QEMU's main loop may be blocked)")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise TransportError(f"QMP {self.path}: {exc}") from None
            if not chunk:
                raise TransportError(f"QMP {self.path}: QEMU closed the monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise TransportError(f"QMP {self.path}: bad JSON {line[:80]!r}: {exc}") from None
