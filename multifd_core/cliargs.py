"""The command line's option types and parser: one-line usage errors that exit 2, every
option's default in its help, sizes, seconds, counts, addresses."""

from __future__ import annotations

import argparse
import math
from typing import Any, NoReturn

from multifd_core.errors import MultiFDError

EXIT_USAGE = 2


class HelpFormatter(argparse.HelpFormatter):
    """Help with each option's default appended, unless its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help: its description and the environment list as written."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and exit 2, like ``UsageError``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"multifd: error: {message} (see: {self.prog} --help)\n")


def int_range(what: str, low: int, high: int) -> Any:
    """An argparse type: an int from ``low`` to ``high`` (``what`` names it in errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} out of range {low}..{high}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


channel_count = int_range("channel count", 1, 255)


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def wait_seconds(text: str) -> float:
    """Seconds to wait; ``0``, ``inf`` or ``forever``: as long as it takes."""
    if text.strip().lower() in ("inf", "forever", "0"):
        return math.inf
    return seconds(text)


def address(text: str) -> Any:
    from multifd_core.session.transport import parse_address

    try:
        return parse_address(text)
    except MultiFDError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress line on stderr: phase, percent, rate, ETA (default: on "
                        "when stderr is a terminal and --json is not given)")


def add_wait_first(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait-first", type=wait_seconds, default=60.0, metavar="SECONDS",
                   help=f"how long to wait for {what}; 0 or inf: as long as it takes, as "
                        "QEMU's -incoming; once it is in, --timeout applies (default: 60)")



def parse_size(text: str) -> int:
    """``1024``, ``64M``, ``1G``, ``1T`` (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 512M, 64G, 1T"
                                         ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value
