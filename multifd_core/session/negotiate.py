"""The receiver's side of negotiation: which method a native session uses, given the sender's
HELLO, what is installed here and what either side requires."""

from __future__ import annotations

from multifd_core.errors import NegotiationError
from multifd_core.methods.registry import KNOWN_DISTRIBUTIONS, MethodRegistry
from multifd_core.wire.protocol import Hello


def _hint(name: str) -> str:
    dist = KNOWN_DISTRIBUTIONS.get(name)
    return f" (pip install {dist})" if dist else ""


def negotiate_method(hello: Hello, registry: MethodRegistry, forced: str | None) -> str:
    """The receiver's choice: the method forced by either side, else the first offer it can
    decode. Raises NegotiationError naming what each side has and what to install."""
    offered = [o.name for o in hello.offers]
    wanted = forced or hello.method
    if forced and hello.method and forced != hello.method:
        raise NegotiationError(f"sender requires method {hello.method}, receiver requires "
                               f"{forced}")
    if wanted:
        if wanted not in offered:
            raise NegotiationError(
                f"receiver requires method {wanted}; the sender offers {', '.join(offered)}: "
                f"install it on the sender{_hint(wanted)}")
        if wanted not in registry:
            if registry.excluded_plugin(wanted):
                raise NegotiationError(
                    f"sender requires method {wanted}, which is installed on the receiver but "
                    f"excluded by MULTIFD_PLUGINS there (receiver has "
                    f"{', '.join(registry.names())})")
            raise NegotiationError(
                f"sender requires method {wanted}, which the receiver does not have "
                f"(receiver has {', '.join(registry.names())}): install it on the receiver"
                f"{_hint(wanted)}")
        ok, why = registry.get(wanted).cls.available()
        if not ok:
            raise NegotiationError(f"method {wanted} cannot run on the receiver: {why}")
        check_code(hello, registry, wanted)
        return wanted
    here = [e.name for e in registry.entries() if e.cls.available()[0]]  # probes libraries
    for name in offered:
        if name in here:
            check_code(hello, registry, name)
            return name
    raise NegotiationError(f"no common method: sender offers {', '.join(offered)}; receiver "
                           f"has {', '.join(here)}")


def check_code(hello: Hello, registry: MethodRegistry, name: str) -> None:
    theirs = next(o for o in hello.offers if o.name == name)
    ours = registry.get(name).code
    if theirs.code != ours:
        raise NegotiationError(f"method {name} has code {theirs.code:#04x} on the sender and "
                               f"{ours:#04x} on the receiver")
