"""Node keys on disk, and agreement with an independent Ed25519 (`cryptography`)."""

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import EnvelopeType, pack_envelope, signing_message
from worker.core.errors import KeyFileError, SignatureError
from worker.core.signing import NodeKey, load_key_file, parse_public_key, verify, write_key_file

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS: list[dict[str, Any]] = json.loads((VECTORS_DIR / "envelopes.json").read_text())


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# -- key files ---------------------------------------------------------------------------


def test_keygen_writes_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "node.key"
    key = write_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).node_id == key.node_id
    assert len(path.read_text().strip()) == 64


def test_keygen_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_key_file(tmp_path / "node.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = write_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path)
    assert path.read_bytes() == before
    assert load_key_file(path).node_id == first.node_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o620])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    write_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="group or others") as info:
        load_key_file(path)
    assert "chmod 600" in str(info.value)


def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = write_key_file(path)
    path.chmod(0o400)
    assert load_key_file(path).node_id == key.node_id


def test_load_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="keygen"):
        load_key_file(tmp_path / "absent.key")


@pytest.mark.parametrize(
    "content",
    ["", "\n", "zz" * 32, "ab" * 31, "ab" * 33, "ab" * 64, "0x" + "ab" * 31, "not a key at all"],
)
def test_load_refuses_malformed_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="64 hex characters"):
        load_key_file(path)


def test_load_accepts_surrounding_whitespace_and_uppercase(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "node.key"
    path.write_text("  " + key.seed_hex().upper() + "\n\n")
    path.chmod(0o600)
    assert load_key_file(path).node_id == key.node_id


def test_seed_never_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "node.key"
    key = write_key_file(path)
    seed = key.seed_hex()
    loaded = load_key_file(path)
    logging.getLogger("test").info("key %s %r", loaded, loaded)
    texts = [repr(key), str(key), repr(loaded), str(loaded), f"{loaded}", caplog.text]

    path.chmod(0o644)
    with pytest.raises(KeyFileError) as unsafe:
        load_key_file(path)
    texts.append(str(unsafe.value))
    texts.append(repr(unsafe.value))
    with pytest.raises(KeyFileError) as exists:
        write_key_file(path)
    texts.append(str(exists.value))

    bad = tmp_path / "bad.key"
    bad.write_text(seed[:-2] + "zz\n")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError) as malformed:
        load_key_file(bad)
    texts.append(str(malformed.value))
    texts.append(repr(malformed.value.__cause__))
    for text in texts:
        assert seed not in text.lower()
        assert seed[:-2] not in text.lower()
    assert key.node_id in repr(key)
    assert not hasattr(key, "__dict__")


def test_parse_public_key() -> None:
    key = NodeKey.generate()
    assert parse_public_key(key.node_id.upper()) == key.public_key
    for bad in ("", key.node_id[:-2], key.node_id + "00", "g" * 64):
        with pytest.raises(ValueError, match="Ed25519 public key"):
            parse_public_key(bad)


# -- cryptography as an independent verifier ----------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
bodies = st.dictionaries(st.text(max_size=8), ints | st.text(max_size=20), max_size=5)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.sampled_from(list(EnvelopeType)), bodies)
def test_project_signatures_verify_with_cryptography(
    seed: bytes, typ: EnvelopeType, body: dict[str, Any]
) -> None:
    node = NodeKey.from_seed(seed)
    env = msgpack.unpackb(node.sign(typ, body), raw=False)
    ours = Ed25519PrivateKey.from_private_bytes(seed)
    assert env["key"] == raw_public(ours)
    public = Ed25519PublicKey.from_public_bytes(env["key"])
    public.verify(env["sig"], b"resultity/v1/" + typ.value.encode() + b"\n" + env["body"])
    with pytest.raises(InvalidSignature):
        public.verify(
            env["sig"], b"resultity/v1/" + typ.value.encode() + b"\n" + env["body"] + b"x"
        )
    # Ed25519 is deterministic: the independent implementation signs identically
    assert ours.sign(signing_message(typ.value, env["body"])) == env["sig"]


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.sampled_from(list(EnvelopeType)), bodies)
def test_cryptography_signatures_verify_in_the_project(
    seed: bytes, typ: EnvelopeType, body: dict[str, Any]
) -> None:
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = raw_public(private)
    if typ != EnvelopeType.CONFIG:
        body = body | {"node_id": public.hex()}
    raw = msgpack.packb(body, use_bin_type=True)
    sig = private.sign(b"resultity/v1/" + typ.value.encode() + b"\n" + raw)
    data = pack_envelope(typ.value, raw, public, sig)
    verified = verify(data, authority_keys=[public])
    assert verified.body == body
    assert verified.signer == public.hex()
    forged = pack_envelope(typ.value, raw + b"\xc0", public, sig)
    with pytest.raises(SignatureError):
        verify(forged, authority_keys=[public])


# -- committed vectors ---------------------------------------------------------------------


def test_vectors_cover_both_outcomes() -> None:
    outcomes = [v["expect"] for v in VECTORS]
    assert outcomes.count("ok") >= 4 and outcomes.count("fail") >= 4
    assert {v["typ"] for v in VECTORS} == {t.value for t in EnvelopeType}


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_verifies_as_expected_in_the_project(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["envelope"])
    authorities = [bytes.fromhex(k) for k in vector["authority"]]
    if vector["expect"] == "ok":
        verified = verify(data, authority_keys=authorities)
        assert verified.typ.value == vector["typ"]
        assert verified.raw_body == bytes.fromhex(vector["body"])
        assert (
            verified.signer
            == raw_public(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["seed"]))).hex()
        )
    else:
        with pytest.raises(SignatureError):
            verify(data, authority_keys=authorities)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_matches_cryptography_and_project_signing(vector: dict[str, Any]) -> None:
    env = msgpack.unpackb(bytes.fromhex(vector["envelope"]), raw=False)
    public = Ed25519PublicKey.from_public_bytes(env["key"])
    message = b"resultity/v1/" + vector["typ"].encode() + b"\n" + env["body"]
    if vector["expect"] == "ok":
        public.verify(env["sig"], message)
        node = NodeKey.from_seed(bytes.fromhex(vector["seed"]))
        assert node.sign_bytes(vector["typ"], env["body"]).hex() == vector["envelope"]
    elif vector["name"] in {"result-body-tampered", "event-sig-tampered", "typ-swapped"}:
        with pytest.raises(InvalidSignature):
            public.verify(env["sig"], message)


def test_vectors_file_is_up_to_date() -> None:
    script = VECTORS_DIR / "make_vectors.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the key file is opened once, then checked on the descriptor (issue 11, item 11) ------


def test_load_refuses_a_key_file_owned_by_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = tmp_path / "node.key"
    write_key_file(path)
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        load_key_file(path)


@pytest.mark.timeout(10)
def test_load_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    # A check on the path and a read of the path are two lookups; a fifo (or a swap of
    # the file between them) must not reach the read. Today's code blocks here.
    path = tmp_path / "node.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_file(path)


def test_load_reads_a_bounded_amount(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_text("ab" * 32 + "\n" + " " * (1 << 20))
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="64 hex characters"):
        load_key_file(path)
