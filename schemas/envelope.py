"""The signed envelope (PROTOCOL.md, "Identities and signatures"): structure only, no crypto.

The signature covers `b"resultity/v1/" + typ + b"\\n" + body`, the body bytes exactly as
received, so no canonical msgpack form is needed.
"""

from enum import StrEnum
from typing import Any

import msgpack

from schemas.codec import DEFAULT_MAX_BYTES, unpack_map
from schemas.errors import SchemaError

ENVELOPE_VERSION = 1
SIGNING_DOMAIN = b"resultity/v1/"


class EnvelopeType(StrEnum):
    RESULT = "result"
    ERROR = "error"
    EVENT = "event"
    CONFIG = "config"
    STREAM = "stream"
    ADMISSION = "admission"


def signing_message(typ: str, body: bytes) -> bytes:
    return SIGNING_DOMAIN + typ.encode() + b"\n" + body


def pack_envelope(typ: str, body: bytes, key: bytes, sig: bytes) -> bytes:
    packed: bytes = msgpack.packb(
        {"v": ENVELOPE_VERSION, "typ": typ, "body": body, "key": key, "sig": sig},
        use_bin_type=True,
    )
    return packed


class RawEnvelope:
    """An envelope whose structure is valid but whose signature is not yet checked."""

    __slots__ = ("typ", "body", "key", "sig")

    def __init__(self, typ: EnvelopeType, body: bytes, key: bytes, sig: bytes) -> None:
        self.typ = typ
        self.body = body
        self.key = key
        self.sig = sig

    def __repr__(self) -> str:
        return f"RawEnvelope(typ={self.typ.value!r}, key={self.key.hex()}, body={len(self.body)}B)"


def unpack_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> RawEnvelope:
    """Check an envelope's structure; raises `SchemaError` naming the broken field."""
    env: dict[str, Any] = unpack_map(data, max_bytes=max_bytes)
    extra = set(env) - {"v", "typ", "body", "key", "sig"}
    if extra:
        raise SchemaError(f"unknown keys {sorted(extra)}", field="envelope")
    if type(env.get("v")) is not int or env["v"] != ENVELOPE_VERSION:
        raise SchemaError(f"must be {ENVELOPE_VERSION}", field="v")
    typ = env.get("typ")
    if not isinstance(typ, str) or typ not in EnvelopeType.__members__.values():
        raise SchemaError(f"must be one of {[t.value for t in EnvelopeType]}", field="typ")
    for name, size in (("body", None), ("key", 32), ("sig", 64)):
        value = env.get(name)
        if not isinstance(value, bytes):
            raise SchemaError("must be msgpack bin", field=name)
        if size is not None and len(value) != size:
            raise SchemaError(f"must be {size} bytes, got {len(value)}", field=name)
    return RawEnvelope(EnvelopeType(typ), env["body"], env["key"], env["sig"])
