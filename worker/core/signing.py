"""Node identity and signed envelopes: Ed25519 through PyNaCl.

The key file holds the 32-byte Ed25519 seed as 64 hex characters and must not be readable
by group or others. The seed never appears in a repr, log line or error message.
"""

import os
import stat
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from schemas.codec import DEFAULT_MAX_BYTES, unpack_map
from schemas.envelope import (
    EnvelopeType,
    RawEnvelope,
    pack_envelope,
    signing_message,
    unpack_envelope,
)
from schemas.errors import SchemaError
from worker.core.errors import KeyFileError, SignatureError, UntrustedSigner

MAX_KEY_FILE_BYTES = 4096


class NodeKey:
    """An Ed25519 signing key; `node_id` is the hex of its public key."""

    __slots__ = ("_key", "public_key", "node_id")

    def __init__(self, key: SigningKey) -> None:
        self._key = key
        self.public_key: bytes = bytes(key.verify_key)
        self.node_id: str = self.public_key.hex()

    @classmethod
    def generate(cls) -> "NodeKey":
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "NodeKey":
        return cls(SigningKey(seed))

    def __repr__(self) -> str:
        return f"NodeKey(node_id={self.node_id})"

    def sign_bytes(self, typ: str, body: bytes) -> bytes:
        """The envelope for `body` (already msgpack-encoded)."""
        sig = self._key.sign(signing_message(typ, body)).signature
        return pack_envelope(typ, body, self.public_key, sig)

    def sign(self, typ: EnvelopeType | str, body: Mapping[str, Any]) -> bytes:
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return self.sign_bytes(str(typ), packed)

    def seed_hex(self) -> str:
        """For writing the key file only."""
        return bytes(self._key).hex()


def write_key_file(path: Path, key: NodeKey | None = None) -> NodeKey:
    """Create a new key file (mode 0600); refuses to overwrite an existing one."""
    key = key or NodeKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"key file {path} already exists; remove it or choose another path"
        ) from exc
    with os.fdopen(fd, "w") as f:
        f.write(key.seed_hex() + "\n")
    return key


def load_key_file(path: Path) -> NodeKey:
    """Load the node key.

    The file is opened once (never blocking: a fifo is refused, not waited on) and every
    check is made on that descriptor: a regular file, owned by the user the node runs
    as, not readable or writable by group or others, at most `MAX_KEY_FILE_BYTES`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"key file {path} does not exist; create one with 'resultity-node keygen --out {path}'"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be opened: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        euid = os.geteuid()
        if st.st_uid != euid:
            raise KeyFileError(
                f"key file {path} is owned by uid {st.st_uid}, not by uid {euid} that the "
                f"node runs as; run 'chown {euid} {path}'"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run 'chmod 600 {path}'"
            )
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, 4096)):
            data += chunk
    finally:
        os.close(fd)
    try:
        seed = (
            bytes.fromhex(data.decode("ascii").strip()) if len(data) <= MAX_KEY_FILE_BYTES else b""
        )
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyFileError(f"key file {path} must hold 64 hex characters (an Ed25519 seed)")
    return NodeKey.from_seed(seed)


def parse_public_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"not a 64-hex-character Ed25519 public key: {text!r:.80}")
    return key


class Verified:
    """A verified envelope: the signer's key and the decoded body."""

    __slots__ = ("typ", "key", "body", "raw_body")

    def __init__(
        self, typ: EnvelopeType, key: bytes, body: dict[str, Any], raw_body: bytes
    ) -> None:
        self.typ = typ
        self.key = key
        self.body = body
        self.raw_body = raw_body

    @property
    def signer(self) -> str:
        return self.key.hex()


def check_signature(env: RawEnvelope) -> None:
    try:
        VerifyKey(env.key).verify(signing_message(env.typ.value, env.body), env.sig)
    except (BadSignatureError, ValueError) as exc:
        raise SignatureError(f"{env.typ.value} envelope signature does not verify") from exc


AUTHORITY_TYPES = frozenset({EnvelopeType.CONFIG, EnvelopeType.ADMISSION})
"""Envelopes an authority signs; every other type is signed by the node it names."""


def verify(
    data: bytes,
    *,
    authority_keys: Iterable[bytes] = (),
    expect: EnvelopeType | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    signers: Container[bytes] | None = None,
) -> Verified:
    """Verify an envelope, then decode its body.

    `config` and `admission` envelopes must be signed by one of `authority_keys`; every
    other type by the node whose hex public key is the body's `node_id`. With `signers`
    (the admitted nodes), a node envelope whose key is not among them is refused before
    its signature is checked: a flood of strangers' messages costs no verification.
    Raises `SignatureError` only.
    """
    try:
        env = unpack_envelope(data, max_bytes=max_bytes)
    except SchemaError as exc:
        raise SignatureError(f"not a valid envelope: {exc}") from exc
    if expect is not None and env.typ != expect:
        raise SignatureError(f"expected a {expect.value} envelope, got {env.typ.value}")
    by_authority = env.typ in AUTHORITY_TYPES
    if by_authority and env.key not in set(authority_keys):
        raise SignatureError(
            f"{env.typ.value} signed by {env.key.hex()}, which is not a trusted authority key"
        )
    if not by_authority and signers is not None and env.key not in signers:
        raise UntrustedSigner(f"{env.typ.value} signed by {env.key.hex()}, not an admitted node")
    check_signature(env)
    try:
        body = unpack_map(env.body, max_bytes=max_bytes)
    except SchemaError as exc:
        raise SignatureError(f"signed body is not a msgpack map: {exc}") from exc
    if not by_authority and body.get("node_id") != env.key.hex():
        raise SignatureError("body node_id does not match the signing key")
    return Verified(env.typ, env.key, body, env.body)
