"""The native session's main-channel protocol, sans-IO: frames, messages, negotiation.

A frame is ``b"MFDS" | be16 version | be16 type | be32 length`` and a JSON object body of at
most 1 MiB. The sender opens with HELLO (uuid, page size, channel count, ramblocks, offered
methods); the receiver answers ACCEPT (the chosen method) or REFUSE (why, and what to install).
ROUND markers pair with one SYNC packet per channel; DONE carries each block's sha256, and the
receiver's RESULT says whether the digests matched.

Optional fields, ignored by peers that predate them: ACCEPT's and DONE's ``engine`` (the
receiver's and the sender's engine description, ``parse_side``), REFUSE's ``method`` (the method
the receiver requires, so a sender that has it installed but excluded can say so).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from multifd_core.errors import WireError
from multifd_core.wire.packets import RAMBLOCK_NAME_LEN, check_page_size

MAGIC = b"MFDS"
PROTO_VERSION = 1
FRAME = struct.Struct(">4sHHI")
FRAME_LEN = FRAME.size
MAX_BODY = 1 << 20
MAX_BLOCKS = 4096
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


#: Block digests a HELLO may name (``engine.digest`` computes them).
DIGESTS = ("blake3", "sha256")


class Msg(IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    ROUND = 4
    DONE = 5
    RESULT = 6
    PROBE = 7  # raw bytes, not JSON: link measurement for --compression auto (before HELLO)
    PROBE_END = 8
    PROBE_RESULT = 9


#: The most probe bytes a receiver reads before HELLO.
MAX_PROBE_BYTES = 256 << 20


def encode(kind: Msg, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    if len(raw) > MAX_BODY:
        raise WireError("session message too large", field="length", received=len(raw),
                        expected=f"<= {MAX_BODY}")
    return FRAME.pack(MAGIC, PROTO_VERSION, int(kind), len(raw)) + raw


def encode_raw(kind: Msg, raw: bytes) -> bytes:
    """A frame whose body is raw bytes (PROBE)."""
    if len(raw) > MAX_BODY:
        raise WireError("session message too large", field="length", received=len(raw),
                        expected=f"<= {MAX_BODY}")
    return FRAME.pack(MAGIC, PROTO_VERSION, int(kind), len(raw)) + raw


def decode_frame(header: bytes | memoryview) -> tuple[Msg, int]:
    """Check a frame header; return the message type and body length."""
    magic, version, kind, length = FRAME.unpack(header)
    if magic != MAGIC:
        raise WireError("not a multifd session", field="magic", received=bytes(magic),
                        expected=MAGIC)
    if version != PROTO_VERSION:
        raise WireError("unsupported session protocol version", field="version",
                        received=version, expected=PROTO_VERSION)
    try:
        msg = Msg(kind)
    except ValueError:
        raise WireError("unknown session message type", field="type", received=kind,
                        expected=f"1..{len(Msg)}") from None
    if length > MAX_BODY:
        raise WireError("session message too large", field="length", received=length,
                        expected=f"<= {MAX_BODY}")
    return msg, length


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError("session message is not valid JSON", field="body",
                        received=str(exc)[:80], expected="a JSON object") from None
    if not isinstance(body, dict):
        raise WireError("session message is not a JSON object", field="body",
                        received=type(body).__name__, expected="object")
    return body


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
         field: str | None = None) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise WireError(f"bad {what}", field=field or key, received=repr(value)[:60],
                        expected=getattr(kind, "__name__", str(kind)))
    return value


@dataclass(frozen=True)
class Offer:
    name: str
    code: int
    version: str


@dataclass(frozen=True)
class Hello:
    uuid: bytes
    page_size: int
    channels: int
    blocks: list[tuple[str, int]]
    offers: list[Offer]
    method: str | None = None
    level: int | None = None
    #: The block digest DONE carries (``DIGESTS``); a HELLO without the field means sha256.
    digest: str = "sha256"

    def to_body(self) -> dict[str, Any]:
        return {"uuid": self.uuid.hex(), "page_size": self.page_size,
                "channels": self.channels,
                "blocks": [{"name": n, "length": ln} for n, ln in self.blocks],
                "offers": [{"name": o.name, "code": o.code, "version": o.version}
                           for o in self.offers],
                "method": self.method, "level": self.level, "digest": self.digest}


def parse_hello(body: dict[str, Any], *, max_channels: int = 255,
                max_total: int = 1 << 44) -> Hello:
    """Validate a HELLO body: every field, with limits on what a peer can make us allocate."""
    uuid = _get(body, "uuid", str, "session uuid")
    if not _HEX32.fullmatch(uuid):
        raise WireError("bad session uuid", field="uuid", received=ascii(uuid[:40]),
                        expected="32 hex digits")
    page_size = _get(body, "page_size", int, "page size")
    check_page_size(page_size)
    channels = _get(body, "channels", int, "channel count")
    if not 1 <= channels <= max_channels:
        raise WireError("channel count out of range", field="channels", received=channels,
                        expected=f"1..{max_channels}")
    raw_blocks = _get(body, "blocks", list, "ramblock list")
    if not 1 <= len(raw_blocks) <= MAX_BLOCKS:
        raise WireError("bad number of ramblocks", field="blocks", received=len(raw_blocks),
                        expected=f"1..{MAX_BLOCKS}")
    blocks: list[tuple[str, int]] = []
    seen: set[str] = set()
    total = 0
    for item in raw_blocks:
        if not isinstance(item, dict):
            raise WireError("bad ramblock entry", field="blocks", received=repr(item)[:60],
                            expected="an object with name and length")
        name = _get(item, "name", str, "ramblock name", "blocks.name")
        raw = name.encode("utf-8", "replace")
        if (not raw or len(raw) >= RAMBLOCK_NAME_LEN or "\0" in name or name in seen
                or not _encodable(name)):
            raise WireError("bad ramblock name", field="blocks.name", received=ascii(name[:60]),
                            expected="1..255 bytes of UTF-8, no NUL, unique")
        length = _get(item, "length", int, "ramblock length", "blocks.length")
        if length <= 0 or length % page_size:
            raise WireError(f"bad length for ramblock {name}", field="blocks.length",
                            received=length, expected=f"a positive multiple of {page_size}")
        seen.add(name)
        total += length
        blocks.append((name, length))
    if total > max_total:
        raise WireError("ramblocks too large", field="blocks", received=total,
                        expected=f"<= {max_total} bytes in all")
    offers = []
    for item in _get(body, "offers", list, "method offers")[:64]:
        if not isinstance(item, dict):
            raise WireError("bad method offer", field="offers", received=repr(item)[:60],
                            expected="an object")
        offers.append(Offer(_get(item, "name", str, "method name", "offers.name")[:64],
                            _get(item, "code", int, "method code", "offers.code"),
                            str(item.get("version", ""))[:32]))
    method = body.get("method")
    if method is not None and not isinstance(method, str):
        raise WireError("bad forced method", field="method", received=repr(method)[:40],
                        expected="a method name or null")
    level = body.get("level")
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
        raise WireError("bad level", field="level", received=repr(level)[:40],
                        expected="an integer or null")
    digest = body.get("digest", "sha256")
    if digest not in DIGESTS:
        raise WireError("unknown block digest", field="digest", received=repr(digest)[:40],
                        expected=" or ".join(DIGESTS))
    return Hello(bytes.fromhex(uuid), page_size, channels, blocks, offers, method, level,
                 digest)


def _encodable(text: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot (lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


#: The fields of a side's engine description, with the JSON types each may take.
SIDE_KEYS: dict[str, tuple[type, ...]] = {
    "method": (str,), "level": (int, type(None)), "engine": (str,), "kind": (str,),
    "library": (str, type(None)), "library_version": (str, type(None)),
    "path": (str, type(None))}
MAX_SIDE_TEXT = 200


def parse_side(value: Any, message: str) -> dict[str, Any] | None:
    """A peer's engine description (``engine`` of ACCEPT or DONE): None when absent (an older
    peer), else every field checked (type, at most 200 characters)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise WireError(f"bad engine description in {message}", field="engine",
                        received=repr(value)[:60], expected="an object")
    side: dict[str, Any] = {}
    for key, kinds in SIDE_KEYS.items():
        item = value.get(key)
        if not isinstance(item, kinds) or isinstance(item, bool) or (
                isinstance(item, str) and len(item) > MAX_SIDE_TEXT):
            raise WireError(f"bad engine description in {message}", field=f"engine.{key}",
                            received=repr(item)[:60],
                            expected=" or ".join("null" if k is type(None) else k.__name__
                                                 for k in kinds) + f", <= {MAX_SIDE_TEXT} chars")
        side[key] = item
    return side


def parse_digests(body: dict[str, Any], names: list[str]) -> dict[str, str]:
    digests = _get(body, "digests", dict, "digests")
    out = {}
    for name in names:
        d = digests.get(name)
        if not isinstance(d, str) or not _HEX64.fullmatch(d):
            raise WireError(f"bad digest for ramblock {name}", field="digests",
                            received=repr(d)[:70], expected="64 hex digits")
        out[name] = d
    return out
