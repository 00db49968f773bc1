"""Write envelopes.json: signed-envelope test vectors made without the project's own code.

Signing uses `cryptography`'s Ed25519 and packing uses plain msgpack, so the vectors are an
independent check of `worker.core.signing`. Seeds are fixed and Ed25519 is deterministic: running
this again gives the same file. Usage: python tests/vectors/make_vectors.py [--check]
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

OUT = Path(__file__).with_name("envelopes.json")
DOMAIN = b"resultity/v1/"


def seed(label: str) -> bytes:
    return hashlib.sha256(b"resultity test vector " + label.encode()).digest()


def public(seed_bytes: bytes) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed_bytes).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(seed_bytes: bytes, typ: str, body: bytes) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed_bytes)
    return key.sign(DOMAIN + typ.encode() + b"\n" + body)


def pack(typ: str, body: bytes, key: bytes, sig: bytes) -> bytes:
    envelope = {"v": 1, "typ": typ, "body": body, "key": key, "sig": sig}
    packed: bytes = msgpack.packb(envelope, use_bin_type=True)
    return packed


def vector(
    name: str,
    label: str,
    typ: str,
    body: dict[str, Any],
    *,
    authority: tuple[str, ...] = (),
    expect: str = "ok",
    sign_typ: str | None = None,
    tamper: str | None = None,
    signer_label: str | None = None,
) -> dict[str, Any]:
    s = seed(label)
    raw = msgpack.packb(body, use_bin_type=True)
    key = public(s)
    sig = sign(seed(signer_label or label), sign_typ or typ, raw)
    sent = raw
    if tamper == "body":
        sent = raw[:-1] + bytes([raw[-1] ^ 0x01])
    elif tamper == "sig":
        sig = sig[:10] + bytes([sig[10] ^ 0x80]) + sig[11:]
    return {
        "name": name,
        "seed": s.hex(),
        "typ": typ,
        "body": sent.hex(),
        "authority": list(authority),
        "envelope": pack(typ, sent, key, sig).hex(),
        "expect": expect,
    }


def vectors() -> list[dict[str, Any]]:
    node = public(seed("node-a")).hex()
    node_b = public(seed("node-b")).hex()
    authority = public(seed("authority")).hex()
    result = {
        "job_id": "job-1",
        "node_id": node,
        "output": {"text": "hi", "token_ids": [1, 2], "finish_reason": "stop"},
        "attempt": 1,
        "started_at": 1700000000.25,
        "finished_at": 1700000001.5,
    }
    error = {
        "node_id": node,
        "code": "BAD_REQUEST",
        "message": "job_id: bad",
        "retryable": False,
        "at": 1700000000.0,
    }
    event = {"node_id": node_b, "kind": "started", "at": 1700000000.0, "details": {}}
    config = {"version": 1, "issued_at": 1700000000.0, "models": [], "runtime": {}}
    admission = {"node_id": node, "network": "devnet", "admitted_at": 1700000000.0}
    stream = {
        "job_id": "job-1",
        "node_id": node,
        "attempt": 1,
        "seq": 0,
        "token_ids": [1],
        "text": "hi",
    }
    return [
        vector("result", "node-a", "result", result),
        vector("error", "node-a", "error", error),
        vector("event", "node-b", "event", event),
        vector("config", "authority", "config", config, authority=(authority,)),
        vector("stream", "node-a", "stream", stream),
        vector("admission", "authority", "admission", admission, authority=(authority,)),
        vector(
            "admission-by-the-node", "node-a", "admission", admission, authority=(authority,),
            expect="fail",
        ),
        vector("result-body-tampered", "node-a", "result", result, tamper="body", expect="fail"),
        vector("event-sig-tampered", "node-b", "event", event, tamper="sig", expect="fail"),
        vector("typ-swapped", "node-a", "error", error, sign_typ="result", expect="fail"),
        vector("node-id-mismatch", "node-a", "event", event, expect="fail"),
        vector("config-untrusted", "node-a", "config", config, authority=(authority,), expect="fail"),
        vector("config-no-authority", "authority", "config", config, expect="fail"),
        vector("signed-by-other-key", "node-a", "result", result, signer_label="node-b", expect="fail"),
    ]


def render() -> str:
    return json.dumps(vectors(), indent=2) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale; run python {Path(__file__).as_posix()}")  # noqa: T201
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
