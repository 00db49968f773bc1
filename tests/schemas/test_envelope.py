"""The signed envelope: structure, round trips, and tampering of any bit."""

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import (
    EnvelopeType,
    pack_envelope,
    signing_message,
    unpack_envelope,
)
from schemas.errors import SchemaError
from worker.core.errors import SignatureError
from worker.core.signing import AUTHORITY_TYPES, NodeKey, verify

NODE = NodeKey.from_seed(bytes(range(32)))
AUTHORITY = NodeKey.from_seed(bytes(range(1, 33)))
NODE_TYPES = [EnvelopeType.RESULT, EnvelopeType.ERROR, EnvelopeType.EVENT]


def fields(data: bytes) -> dict[str, Any]:
    value: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return value


def repack(data: bytes, **over: Any) -> bytes:
    env = fields(data) | over
    packed: bytes = msgpack.packb(env, use_bin_type=True)
    return packed


def signed(typ: EnvelopeType, body: dict[str, Any] | None = None) -> bytes:
    key = AUTHORITY if typ == EnvelopeType.CONFIG else NODE
    return key.sign(typ, body if body is not None else {"node_id": key.node_id, "n": 1})


def test_envelope_has_exactly_the_protocol_fields() -> None:
    env = fields(signed(EnvelopeType.RESULT))
    assert set(env) == {"v", "typ", "body", "key", "sig"}
    assert env["v"] == 1
    assert env["typ"] == "result"
    assert env["key"] == NODE.public_key and len(env["key"]) == 32
    assert len(env["sig"]) == 64
    assert msgpack.unpackb(env["body"]) == {"node_id": NODE.node_id, "n": 1}


def test_signing_message_is_domain_typ_newline_body() -> None:
    assert signing_message("result", b"\x80") == b"resultity/v1/result\n\x80"


def test_node_id_is_lowercase_hex_of_public_key() -> None:
    assert NODE.node_id == NODE.public_key.hex()
    assert len(NODE.node_id) == 64 and NODE.node_id == NODE.node_id.lower()


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"v": 2}, "v: must be 1"),
        ({"v": 0}, "v: must be 1"),
        ({"v": True}, "v: must be 1"),
        ({"v": 1.0}, "v: must be 1"),
        ({"v": "1"}, "v: must be 1"),
        ({"typ": "results"}, "typ: must be one of"),
        ({"typ": "RESULT"}, "typ: must be one of"),
        ({"typ": b"result"}, "typ: must be one of"),
        ({"typ": 1}, "typ: must be one of"),
        ({"body": "text"}, "body: must be msgpack bin"),
        ({"body": {"node_id": "x"}}, "body: must be msgpack bin"),
        ({"key": b"k" * 31}, "key: must be 32 bytes, got 31"),
        ({"key": b"k" * 33}, "key: must be 32 bytes, got 33"),
        ({"key": "k" * 32}, "key: must be msgpack bin"),
        ({"key": "ab" * 32}, "key: must be msgpack bin"),
        ({"sig": b"s" * 63}, "sig: must be 64 bytes, got 63"),
        ({"sig": b""}, "sig: must be 64 bytes, got 0"),
        ({"sig": None}, "sig: must be msgpack bin"),
        ({"extra": 1}, "envelope: unknown keys ['extra']"),
    ],
)
def test_envelope_structure_rejects(over: dict[str, Any], fragment: str) -> None:
    data = repack(signed(EnvelopeType.RESULT), **over)
    with pytest.raises(SchemaError) as info:
        unpack_envelope(data)
    assert fragment in str(info.value)
    with pytest.raises(SignatureError, match="not a valid envelope"):
        verify(data)


@pytest.mark.parametrize("missing", ["v", "typ", "body", "key", "sig"])
def test_envelope_missing_field(missing: str) -> None:
    env = fields(signed(EnvelopeType.EVENT))
    del env[missing]
    with pytest.raises(SchemaError, match=missing):
        unpack_envelope(msgpack.packb(env, use_bin_type=True))


def test_envelope_with_mixed_unknown_keys_is_a_schema_error() -> None:
    data = msgpack.packb({"zz": 1, b"yy": 2, "v": 1}, use_bin_type=True)
    with pytest.raises(SchemaError):
        unpack_envelope(data)


def test_raw_envelope_repr_has_no_signature() -> None:
    raw = unpack_envelope(signed(EnvelopeType.RESULT))
    assert raw.sig.hex() not in repr(raw)


@pytest.mark.parametrize("typ", NODE_TYPES)
def test_node_envelope_verifies_without_authorities(typ: EnvelopeType) -> None:
    verified = verify(signed(typ))
    assert verified.typ == typ
    assert verified.signer == NODE.node_id
    assert verified.body == {"node_id": NODE.node_id, "n": 1}


@pytest.mark.parametrize("typ", NODE_TYPES)
def test_node_envelope_needs_node_id_of_signer(typ: EnvelopeType) -> None:
    other = NodeKey.generate()
    for body in ({"node_id": other.node_id}, {"node_id": NODE.node_id.upper()}, {"n": 1}):
        with pytest.raises(SignatureError, match="node_id"):
            verify(NODE.sign(typ, body))


@pytest.mark.parametrize("typ", NODE_TYPES)
def test_node_envelope_is_not_accepted_by_authority_keys_alone(typ: EnvelopeType) -> None:
    # an authority key signing a result for a node it is not does not verify
    data = AUTHORITY.sign(typ, {"node_id": NODE.node_id})
    with pytest.raises(SignatureError, match="node_id"):
        verify(data, authority_keys=[AUTHORITY.public_key])


def test_config_needs_a_trusted_authority_key() -> None:
    body = {"version": 1}
    assert (
        verify(AUTHORITY.sign("config", body), authority_keys=[AUTHORITY.public_key]).body == body
    )
    with pytest.raises(SignatureError, match="not a trusted authority key"):
        verify(AUTHORITY.sign("config", body))
    with pytest.raises(SignatureError, match="not a trusted authority key"):
        verify(NODE.sign("config", body), authority_keys=[AUTHORITY.public_key])
    # a node cannot make its own config acceptable by naming itself in the body
    with pytest.raises(SignatureError, match="not a trusted authority key"):
        verify(NODE.sign("config", {"node_id": NODE.node_id}))


def test_expect_rejects_other_types() -> None:
    with pytest.raises(SignatureError, match="expected a config envelope, got result"):
        verify(signed(EnvelopeType.RESULT), expect=EnvelopeType.CONFIG)


def test_signed_body_must_be_a_map() -> None:
    body = msgpack.packb([1, 2])
    with pytest.raises(SignatureError, match="not a msgpack map"):
        verify(AUTHORITY.sign_bytes("config", body), authority_keys=[AUTHORITY.public_key])


def test_oversize_envelope() -> None:
    data = NODE.sign("event", {"node_id": NODE.node_id, "pad": "x" * 2000})
    with pytest.raises(SignatureError, match="limit"):
        verify(data, max_bytes=1024)


bodies = st.dictionaries(
    st.text(max_size=8),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    max_size=6,
)
typs = st.sampled_from(list(EnvelopeType))


def sign_for(typ: EnvelopeType, body: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    if typ in AUTHORITY_TYPES:
        return AUTHORITY.sign(typ, body), [AUTHORITY.public_key]
    return NODE.sign(typ, body | {"node_id": NODE.node_id}), []


@settings(max_examples=100, deadline=None)
@given(typs, bodies)
def test_round_trip(typ: EnvelopeType, body: dict[str, Any]) -> None:
    data, authorities = sign_for(typ, body)
    verified = verify(data, authority_keys=authorities, expect=typ)
    expected = body if typ in AUTHORITY_TYPES else body | {"node_id": NODE.node_id}
    assert verified.body == expected
    assert verified.raw_body == fields(data)["body"]
    assert verified.key == (AUTHORITY if typ in AUTHORITY_TYPES else NODE).public_key


def flip(value: bytes, bit: int) -> bytes:
    bit %= len(value) * 8
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(typs, bodies, st.sampled_from(["body", "sig", "key"]), st.integers(min_value=0))
def test_flipping_any_bit_fails(
    typ: EnvelopeType, body: dict[str, Any], part: str, bit: int
) -> None:
    data, authorities = sign_for(typ, body)
    env = fields(data)
    env[part] = flip(env[part], bit)
    if part == "key" and typ in AUTHORITY_TYPES:
        authorities = [*authorities, env["key"]]  # even a trusted key must match the signature
    with pytest.raises(SignatureError):
        verify(msgpack.packb(env, use_bin_type=True), authority_keys=authorities)


@settings(max_examples=100, deadline=None)
@given(typs, typs, bodies)
def test_changing_typ_fails(typ: EnvelopeType, other: EnvelopeType, body: dict[str, Any]) -> None:
    data, authorities = sign_for(typ, body)
    if other == typ:
        return
    tampered = repack(data, typ=other.value)
    with pytest.raises(SignatureError):
        verify(tampered, authority_keys=[AUTHORITY.public_key, NODE.public_key])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_verify_raises_only_signature_error(data: bytes) -> None:
    try:
        verify(data, authority_keys=[AUTHORITY.public_key])
    except SignatureError as exc:
        assert str(exc)


def test_pack_envelope_matches_sign_bytes() -> None:
    body = msgpack.packb({"node_id": NODE.node_id})
    data = NODE.sign_bytes("event", body)
    env = fields(data)
    assert pack_envelope("event", body, NODE.public_key, env["sig"]) == data


# -- duplicate map keys (issue 11, item 11) ------------------------------------------------


def dup_map(*pairs: tuple[str, Any]) -> bytes:
    """A msgpack map with the pairs as given, repeated keys included (msgpack.packb of a
    dict cannot produce one)."""
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_map_header(len(pairs)) + b"".join(
        packer.pack(k) + packer.pack(v) for k, v in pairs
    )


def test_signed_body_with_a_duplicate_key_is_rejected() -> None:
    # Two readers of the same signed bytes must not see two different results.
    body = dup_map(("node_id", NODE.node_id), ("output", "approved"), ("output", "other"))
    with pytest.raises(SignatureError, match="duplicate map key 'output'"):
        verify(NODE.sign_bytes("result", body))


def test_duplicate_key_in_a_nested_map_is_rejected() -> None:
    inner = dup_map(("a", 1), ("a", 2))
    packer = msgpack.Packer()
    body = packer.pack_map_header(2) + packer.pack("node_id") + packer.pack(NODE.node_id)
    body += packer.pack("x") + inner
    with pytest.raises(SignatureError, match="duplicate map key 'a'"):
        verify(NODE.sign_bytes("result", body))


def test_envelope_with_a_duplicate_field_is_rejected() -> None:
    good = fields(signed(EnvelopeType.RESULT))
    env = dup_map(*good.items(), ("body", msgpack.packb({"node_id": NODE.node_id, "n": 2})))
    with pytest.raises(SchemaError, match="duplicate map key 'body'"):
        unpack_envelope(env)
