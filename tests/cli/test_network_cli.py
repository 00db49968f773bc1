"""The network-side commands end to end against a real nats-server."""

import asyncio
import hashlib
import json
import os
from pathlib import Path

import nats
import pytest

from schemas.admission import Admission
from tests.support.securenet import SecureNats
from worker.cli.main import main
from worker.core.registry import read_record
from worker.core.roles import Role
from worker.core.signing import NodeKey, load_key_file
from worker.devtools.natsd import NatsServer
from worker.models.store import ModelStore
from worker.node.snapshots import check_snapshot

pytestmark = pytest.mark.nats


def snapshot_body(version: int) -> dict[str, object]:
    return {
        "network": "devnet",
        "version": version,
        "issued_at": 1.5,
        "runtime": {"name": "echo", "image": "sha256:" + "a" * 64, "engine": "echo"},
        "models": [
            {
                "id": "m1",
                "version": "1",
                "sha256": "b" * 64,
                "size": 10,
                "source": "nats-object://rst_models/m1",
            }
        ],
    }


def test_sign_and_publish_snapshot(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "authority.key"
    assert main(["keygen", "--out", str(key_file)]) == 0
    authority = load_key_file(key_file)
    body = tmp_path / "snapshot.json"
    body.write_text(json.dumps(snapshot_body(3)))
    out = tmp_path / "snapshot.env"
    assert main(["config", "sign", str(body), "--key", str(key_file), "--out", str(out)]) == 0
    snapshot, signer = check_snapshot(out.read_bytes(), {authority.public_key}, network="devnet")
    assert snapshot.version == 3 and signer == authority.node_id

    url = ["--nats-url", nats_server.url]
    assert main(["config", "publish", str(out), *url, "--authority", authority.node_id]) == 0

    async def stored() -> bytes:
        nc = await nats.connect(nats_server.url)
        kv = await nc.jetstream().key_value("rst_config")
        value = (await kv.get("snapshot")).value
        await nc.close()
        assert value is not None
        return value

    assert asyncio.run(stored()) == out.read_bytes()

    body.write_text(json.dumps({**snapshot_body(4), "models": []}))
    capsys.readouterr()
    assert main(["config", "sign", str(body), "--key", str(key_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "invalid snapshot body" in err and len(err.strip().splitlines()) == 1


def test_models_publish_prints_a_spec_the_store_accepts(
    tmp_path: Path, nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    data = os.urandom(1_000_000)
    model = tmp_path / "model.bin"
    model.write_bytes(data)
    capsys.readouterr()
    argv = ["models", "publish", str(model), "--id", "tiny", "--version", "2"]
    assert main([*argv, "--nats-url", nats_server.url]) == 0
    spec_json = json.loads(capsys.readouterr().out)
    assert spec_json["sha256"] == hashlib.sha256(data).hexdigest()
    assert spec_json["size"] == len(data)
    assert spec_json["source"] == "nats-object://rst_models/tiny-2"

    from schemas.snapshot import ModelSpec

    async def fetch() -> bytes:
        nc = await nats.connect(nats_server.url)
        store = ModelStore(tmp_path / "cache", js=nc.jetstream())
        blob = await store.fetch(ModelSpec.model_validate(spec_json))
        await nc.close()
        return blob.read_bytes()

    assert asyncio.run(fetch()) == data


def test_unreachable_nats_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"x")
    argv = ["models", "publish", str(model), "--id", "t", "--version", "1"]
    assert main([*argv, "--nats-url", "nats://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach NATS" in err and len(err.splitlines()) == 1


def test_admit_and_revoke_a_node_as_the_authority(
    tmp_path: Path, secure_nats: SecureNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`admit`/`revoke` sign records into the registry with the authority role's
    credentials; the node role's credentials cannot write it (nats-server refuses)."""
    authority = tmp_path / "authority.key"
    assert main(["keygen", "--out", str(authority)]) == 0
    node = NodeKey.generate()
    settings = secure_nats.settings(
        Role.AUTHORITY, authority_keys=(load_key_file(authority).node_id,)
    )
    env = {
        "RESULTITY_NATS_URL": settings.nats_url,
        "RESULTITY_NATS_CA": str(settings.nats_ca),
        "RESULTITY_AUTHORITY_KEYS": settings.authority_keys[0],
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(
        "RESULTITY_NATS_NKEY_SEED_FILE", str(secure_nats.credentials.seeds[Role.NODE])
    )
    assert main(["admit", node.node_id, "--key", str(authority)]) == 2  # a node cannot

    monkeypatch.setenv(
        "RESULTITY_NATS_NKEY_SEED_FILE", str(secure_nats.credentials.seeds[Role.AUTHORITY])
    )
    assert main(["admit", node.node_id, "--key", str(authority), "--model", "m1"]) == 0

    async def record() -> Admission | None:
        nc = await secure_nats.connect(Role.CLIENT)
        try:
            return await read_record(nc, settings, node.node_id)
        finally:
            await nc.close()

    admitted = asyncio.run(record())
    assert admitted is not None and admitted.admits(settings.network, admitted.admitted_at, "m1")
    assert not admitted.admits(settings.network, admitted.admitted_at, "m2")
    assert main(["revoke", node.node_id, "--key", str(authority)]) == 0
    revoked = asyncio.run(record())
    assert revoked is not None and revoked.revoked
    assert not revoked.admits(settings.network, revoked.admitted_at)
