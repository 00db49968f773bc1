"""Config snapshots against a real nats-server: accept, reject, persist, resume, reconnect."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client

from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.errors import ConfigRejected
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.natsd import NatsServer
from worker.node.snapshots import (
    FLOOR_NAME,
    SAVED_NAME,
    AcceptedSnapshot,
    ConfigWatcher,
    Floor,
    check_snapshot,
    publish_snapshot,
    read_floor,
    write_floor,
)

pytestmark = pytest.mark.nats

AUTHORITY = NodeKey.generate()
BUCKET = "rst_config"
RUNTIME = {"name": "echo", "image": "sha256:" + "a" * 64, "engine": "echo"}


def body(version: int, **over: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "network": "devnet",
        "version": version,
        "issued_at": time.time(),
        "runtime": dict(RUNTIME),
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
    value.update(over)
    return value


def signed(version: int, key: NodeKey = AUTHORITY, **over: Any) -> bytes:
    return key.sign("config", body(version, **over))


class Recorder:
    def __init__(self, fail_times: int = 0) -> None:
        self.applied: list[AcceptedSnapshot] = []
        self.rejected: list[str] = []
        self.fail_times = fail_times
        self.changed = asyncio.Event()

    async def apply(self, accepted: AcceptedSnapshot) -> None:
        if self.fail_times:
            self.fail_times -= 1
            self.changed.set()
            raise RuntimeError("model fetch failed")
        self.applied.append(accepted)
        self.changed.set()

    async def on_rejected(self, exc: ConfigRejected) -> None:
        self.rejected.append(str(exc))
        self.changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def settings(tmp_path: Path, nats_server: NatsServer) -> Settings:
    return make_settings(tmp_path, nats_url=nats_server.url, authority_keys=(AUTHORITY.node_id,))


def watcher(nc: Client, settings: Settings, rec: Recorder, resync: float = 30.0) -> ConfigWatcher:
    return ConfigWatcher(
        nc, settings, apply=rec.apply, on_rejected=rec.on_rejected, resync_interval_s=resync
    )


async def test_current_value_and_updates_are_applied_and_saved(
    nc: Client, settings: Settings
) -> None:
    await publish_snapshot(nc, BUCKET, signed(1))
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        first = await asyncio.wait_for(config.wait_current(), 10)
        assert first.version == 1 and first.origin == "network"
        assert first.signer == AUTHORITY.node_id
        env2 = signed(2)
        await publish_snapshot(nc, BUCKET, env2)
        second = await asyncio.wait_for(config.wait_current(newer_than=1), 10)
        assert second.version == 2
        assert (settings.state_dir / SAVED_NAME).read_bytes() == env2
    assert [a.version for a in rec.applied] == [1, 2]
    assert rec.rejected == []
    await config.aclose()  # twice is fine


def forged(version: int) -> bytes:
    env = msgpack.unpackb(signed(version))
    env["sig"] = bytes([env["sig"][0] ^ 1]) + env["sig"][1:]
    return bytes(msgpack.packb(env, use_bin_type=True))


BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "forged signature": (lambda: forged(5), "signature does not verify"),
    "unknown key": (lambda: signed(5, key=NodeKey.generate()), "not a trusted authority"),
    "older version": (lambda: signed(1), "version 1 is not newer than version 2"),
    "equal version": (lambda: signed(2, issued_at=1.0), "version 2 is not newer"),
    "invalid body": (lambda: signed(5, models=[]), "invalid body"),
    "unpinned image": (
        lambda: signed(5, runtime={"name": "x", "image": "x:latest", "engine": "echo"}),
        "pinned",
    ),
    "truncated envelope": (lambda: signed(5)[:-7], "not a valid envelope"),
    "other network": (lambda: signed(5, network="mainnet"), "network 'mainnet'"),
    "no network": (lambda: AUTHORITY.sign("config", body(5) | {"network": None}), "network"),
    "engine args name a model": (
        lambda: signed(5, runtime={**RUNTIME, "engine": "vllm", "engine_args": {"model": "/x"}}),
        "not allowed",
    ),
    "engine args trust remote code": (
        lambda: signed(
            5, runtime={**RUNTIME, "engine": "vllm", "engine_args": {"trust_remote_code": True}}
        ),
        "not allowed",
    ),
    "engine args download dir": (
        lambda: signed(
            5, runtime={**RUNTIME, "engine": "vllm", "engine_args": {"download_dir": "/tmp"}}
        ),
        "not allowed",
    ),
    "engine arg not a scalar": (
        lambda: signed(5, runtime={**RUNTIME, "engine_args": {"token_delay_ms": b"\x00"}}),
        "engine_args",
    ),
    "wrong type": (lambda: AUTHORITY.sign("event", body(5)), "expected a config envelope"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_snapshot_is_rejected_and_changes_nothing(
    nc: Client, settings: Settings, case: str
) -> None:
    make, reason = BAD[case]
    env2 = signed(2)
    await publish_snapshot(nc, BUCKET, env2)
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        await asyncio.wait_for(config.wait_current(), 10)
        await publish_snapshot(nc, BUCKET, make())
        await rec.until(lambda: bool(rec.rejected))
        assert reason in rec.rejected[0]
        assert config.version == 2 and config.current is not None
        assert config.current.envelope == env2
        assert (settings.state_dir / SAVED_NAME).read_bytes() == env2
        assert [a.version for a in rec.applied] == [2]
        # A good newer snapshot is still accepted afterwards.
        await publish_snapshot(nc, BUCKET, signed(6))
        assert (await asyncio.wait_for(config.wait_current(newer_than=2), 10)).version == 6
    assert len(rec.rejected) == 1


async def test_restart_resumes_from_saved_snapshot_without_network(
    nc: Client, settings: Settings
) -> None:
    env = signed(3)
    await publish_snapshot(nc, BUCKET, env)
    async with watcher(nc, settings, Recorder()) as config:
        await asyncio.wait_for(config.wait_current(), 10)
    await nc.jetstream().delete_key_value(BUCKET)  # the network does not resend anything
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        resumed = await asyncio.wait_for(config.wait_current(), 10)
        assert resumed.version == 3 and resumed.origin == "disk"
        assert resumed.envelope == env
    assert rec.rejected == []


async def test_tampered_saved_snapshot_is_refused_at_load(nc: Client, settings: Settings) -> None:
    settings.state_dir.mkdir(parents=True)
    env = bytearray(signed(4))
    env[-40] ^= 0xFF  # inside the signature or body: either way it must not verify
    (settings.state_dir / SAVED_NAME).write_bytes(bytes(env))
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        await rec.until(lambda: bool(rec.rejected))
        assert "saved" in rec.rejected[0]
        assert config.current is None
        assert rec.applied == []
    assert not (settings.state_dir / SAVED_NAME).exists()
    assert (settings.state_dir / (SAVED_NAME + ".rejected")).exists()


async def test_a_verified_snapshot_is_in_force_even_when_its_apply_fails(
    nc: Client, settings: Settings
) -> None:
    """Only a refused snapshot leaves the previous one in force; retrying a failed apply
    is the agent's business (with backoff), not a reason to fall back to an older one."""
    await publish_snapshot(nc, BUCKET, signed(6))
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        await asyncio.wait_for(config.wait_current(), 10)
        rec.fail_times = 1
        env7 = signed(7)
        await publish_snapshot(nc, BUCKET, env7)
        assert (await asyncio.wait_for(config.wait_current(newer_than=6), 10)).version == 7
        assert rec.fail_times == 0
        assert (settings.state_dir / SAVED_NAME).read_bytes() == env7
        await publish_snapshot(nc, BUCKET, signed(6, issued_at=2.0))
        await rec.until(lambda: bool(rec.rejected))
        assert "version 6 is not newer than version 7" in rec.rejected[0]
    assert [a.version for a in rec.applied] == [6]


async def restarted_with_older_on_network(
    nc: Client, settings: Settings, *, break_saved: Callable[[Path], None]
) -> Recorder:
    """v5 is applied and saved; the node restarts, its saved copy fails (`break_saved`),
    and the network's history offers an older, validly signed v3."""
    await publish_snapshot(nc, BUCKET, signed(5))
    async with watcher(nc, settings, Recorder()) as config:
        await asyncio.wait_for(config.wait_current(), 10)
    break_saved(settings.state_dir / SAVED_NAME)
    await publish_snapshot(nc, BUCKET, signed(3))
    rec = Recorder(fail_times=1)
    async with watcher(nc, settings, rec) as config:
        await rec.until(lambda: any("version 3" in r for r in rec.rejected))
        assert config.current is None or config.current.version == 5
    return rec


async def test_rollback_refused_after_a_restart_whose_first_apply_fails(
    nc: Client, settings: Settings
) -> None:
    rec = await restarted_with_older_on_network(nc, settings, break_saved=lambda path: None)
    assert all(a.version != 3 for a in rec.applied)
    assert "not newer than version 5" in rec.rejected[-1]


async def test_rollback_refused_after_the_saved_snapshot_is_lost(
    nc: Client, settings: Settings
) -> None:
    rec = await restarted_with_older_on_network(nc, settings, break_saved=Path.unlink)
    assert rec.applied == []
    assert "not newer than version 5" in rec.rejected[-1]


async def test_the_same_snapshot_comes_back_after_the_saved_copy_is_damaged(
    nc: Client, settings: Settings
) -> None:
    env = signed(5)
    await publish_snapshot(nc, BUCKET, env)
    async with watcher(nc, settings, Recorder()) as config:
        await asyncio.wait_for(config.wait_current(), 10)
    (settings.state_dir / SAVED_NAME).write_bytes(env[:-3])
    rec = Recorder()
    async with watcher(nc, settings, rec) as config:
        again = await asyncio.wait_for(config.wait_current(), 10)
        assert again.version == 5 and again.origin == "network"
        await publish_snapshot(nc, BUCKET, signed(5, issued_at=3.0))  # same version, other bytes
        await rec.until(lambda: len(rec.rejected) == 2)
    assert "saved" in rec.rejected[0] and "not newer than version 5" in rec.rejected[1]


def test_floor_is_kept_apart_from_the_saved_snapshot(tmp_path: Path) -> None:
    assert read_floor(tmp_path) == Floor()
    write_floor(tmp_path, Floor(12, "e" * 64))
    assert read_floor(tmp_path) == Floor(12, "e" * 64)
    assert not (tmp_path / SAVED_NAME).exists()
    (tmp_path / FLOOR_NAME).write_text("garbage")
    with pytest.raises(ValueError):
        read_floor(tmp_path)


async def test_watch_survives_server_restart(
    nats_server: NatsServer, nc: Client, settings: Settings
) -> None:
    await publish_snapshot(nc, BUCKET, signed(1))
    rec = Recorder()
    async with watcher(nc, settings, rec, resync=0.5) as config:
        await asyncio.wait_for(config.wait_current(), 10)
        await asyncio.to_thread(nats_server.restart)

        async def published() -> bool:
            # Refused until the client has reconnected and JetStream has recovered.
            try:
                await publish_snapshot(nc, BUCKET, signed(2))
            except Exception:
                return False
            return True

        await wait_for(published, timeout=30)
        assert (await asyncio.wait_for(config.wait_current(newer_than=1), 15)).version == 2


def test_check_snapshot_is_pure() -> None:
    snapshot, signer = check_snapshot(signed(9), {AUTHORITY.public_key}, network="devnet")
    assert snapshot.version == 9 and signer == AUTHORITY.node_id
    with pytest.raises(ConfigRejected, match="not newer"):
        check_snapshot(signed(9), {AUTHORITY.public_key}, network="devnet", floor=9)
    with pytest.raises(ConfigRejected, match="for network 'devnet', not 'testnet'"):
        check_snapshot(signed(9), {AUTHORITY.public_key}, network="testnet")


async def test_a_saved_snapshot_below_the_floor_is_never_applied_at_boot(
    nats_server: NatsServer, nc: Client, settings: Settings
) -> None:
    """Issue 20 item 6: the saved copy is v3 but the floor says v10 was verified here (the
    state directory was partly restored, say). With NATS down, nothing else comes: the
    node must apply nothing rather than roll back to v3."""
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / SAVED_NAME).write_bytes(signed(3))
    write_floor(settings.state_dir, Floor(10, "c" * 64))
    await asyncio.to_thread(nats_server.stop)
    rec = Recorder()
    try:
        async with watcher(nc, settings, rec) as config:
            await rec.until(lambda: bool(rec.applied or rec.rejected))
            assert rec.applied == [] and config.current is None
            assert "not newer than version 10" in rec.rejected[0]
            assert config.floor.version == 10
    finally:
        await asyncio.to_thread(nats_server.start)
        await wait_for(lambda: nc.is_connected, 10)
    assert not (settings.state_dir / SAVED_NAME).exists()
