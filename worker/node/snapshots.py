"""Signed configuration snapshots: watch the KV key, verify, hand over in order, persist.

A snapshot is accepted only if its envelope is a `config` signed by a pinned authority key,
its body is a valid `Snapshot` for this node's network, and its version is above the floor:
the highest version this node has ever verified. The floor is written to `state_dir` as
soon as a snapshot verifies, in its own file, so neither a restart whose first apply fails
nor a lost or damaged saved snapshot lets an older signed snapshot back in.

A verified snapshot is in force from then on, whether or not the agent manages to apply it
(a model that fails to fetch or validate is the agent's to retry; it serves nothing
meanwhile). Its envelope is saved to `state_dir` and re-verified when loaded at the next
start. Only a refused snapshot leaves the previous one in force.
"""

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Collection
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.errors import SchemaError
from schemas.snapshot import Snapshot
from worker.core.errors import ConfigRejected, SignatureError
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.core.signing import verify
from worker.core.statefile import write_atomically

log = logging.getLogger(__name__)

SNAPSHOT_KEY = "snapshot"
SAVED_NAME = "snapshot.msgpack"
FLOOR_NAME = "snapshot.floor"
REJECTED_SUFFIX = ".rejected"
MAX_SNAPSHOT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class AcceptedSnapshot:
    """A verified snapshot: its body, the exact envelope bytes, and who signed it."""

    snapshot: Snapshot
    envelope: bytes
    signer: str
    origin: Literal["disk", "network"]

    @property
    def version(self) -> int:
        return self.snapshot.version


ApplySnapshot = Callable[[AcceptedSnapshot], Awaitable[None]]
"""Makes the snapshot real (models, runtime, validation). It is in force even if this raises:
the agent then serves nothing under it and retries."""

ReportRejected = Callable[[ConfigRejected], Awaitable[None]]
"""Publishes `CONFIG_REJECTED` (the exception's text is the reason)."""


def config_bucket(settings: Settings) -> str:
    return f"{settings.subject_prefix}_config"


@dataclass(frozen=True, slots=True)
class Floor:
    """The highest snapshot version verified here, and the SHA-256 of that envelope (the
    same envelope may come again, for example after the saved copy was lost)."""

    version: int = 0
    sha256: str | None = None

    def admits(self, version: int, data: bytes) -> bool:
        if version == self.version and self.sha256 is not None:
            return hashlib.sha256(data).hexdigest() == self.sha256
        return version > self.version


def check_snapshot(
    data: bytes,
    authority_keys: Collection[bytes],
    *,
    network: str | None,
    floor: Floor | int = 0,
) -> tuple[Snapshot, str]:
    """Verify an envelope and its body; returns the snapshot and the signer's hex key.

    Pure: raises `ConfigRejected` saying why (signature, key, body, network, or version).
    `network=None` skips the network check (for tools that only verify a file).
    """
    if isinstance(floor, int):
        floor = Floor(floor)
    try:
        verified = verify(
            data,
            authority_keys=authority_keys,
            expect=EnvelopeType.CONFIG,
            max_bytes=MAX_SNAPSHOT_BYTES,
        )
    except SignatureError as exc:
        raise ConfigRejected(f"snapshot refused: {exc}") from exc
    try:
        snapshot = validate(Snapshot, verified.body)
    except SchemaError as exc:
        raise ConfigRejected(f"snapshot refused: invalid body: {exc}") from exc
    if network is not None and snapshot.network != network:
        raise ConfigRejected(
            f"snapshot refused: it is for network {snapshot.network!r}, not {network!r} "
            "(RESULTITY_NETWORK)"
        )
    if not floor.admits(snapshot.version, data):
        raise ConfigRejected(
            f"snapshot refused: version {snapshot.version} is not newer than "
            f"version {floor.version}, the highest this node has verified"
        )
    return snapshot, verified.signer


def save_snapshot(state_dir: Path, envelope: bytes) -> Path:
    """Write the envelope atomically (temp file, fsync, rename, fsync the directory)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return write_atomically(state_dir / SAVED_NAME, envelope)


def write_floor(state_dir: Path, floor: Floor) -> Path:
    """Record the floor (atomically, like the snapshot): `<version> <sha256>`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return write_atomically(state_dir / FLOOR_NAME, f"{floor.version} {floor.sha256}\n".encode())


def read_floor(state_dir: Path) -> Floor:
    """The recorded floor; version 0 when there is none. `ValueError` when it is damaged."""
    try:
        text = (state_dir / FLOOR_NAME).read_text()
    except FileNotFoundError:
        return Floor()
    version, sha256 = text.split()
    floor = Floor(int(version), sha256)
    if floor.version < 0 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"malformed floor {text.strip()!r}")
    return floor


def load_saved(
    state_dir: Path, authority_keys: Collection[bytes], *, network: str, floor: Floor = Floor()
) -> AcceptedSnapshot | None:
    """The saved snapshot, re-verified against `floor`; None if there is none.

    A saved file that no longer verifies, or that is older than the floor (a state
    directory partly restored from a backup: applying it would be a rollback), is renamed
    to `*.rejected` (kept for the operator, never loaded again) and `ConfigRejected` is
    raised.
    """
    path = state_dir / SAVED_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        snapshot, signer = check_snapshot(data, authority_keys, network=network, floor=floor)
    except ConfigRejected as exc:
        os.replace(path, path.with_name(SAVED_NAME + REJECTED_SUFFIX))
        raise ConfigRejected(f"saved {path} refused: {exc}") from exc
    return AcceptedSnapshot(snapshot, data, signer, "disk")


class ConfigWatcher(AsyncResource):
    """Feeds accepted snapshots to `apply`, one at a time, in version order.

    Usage by the agent:

        async with ConfigWatcher(nc, settings, apply=..., on_rejected=...) as config:
            current = await config.wait_current()

    On entry the floor is read and the saved snapshot (if any) loaded and applied first,
    then the KV key is watched (its current value included). Every `resync_interval_s` the
    watch is re-created and the current value offered again: that survives watchers lost on
    reconnect. A value identical to the one in force, or to the last one rejected, is
    ignored silently so a rejection is reported once.
    """

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        apply: ApplySnapshot,
        on_rejected: ReportRejected,
        resync_interval_s: float = 30.0,
    ) -> None:
        super().__init__()
        self._nc = nc
        self._settings = settings
        self._keys = settings.authority_key_bytes()
        self._apply = apply
        self._on_rejected = on_rejected
        self._resync_interval_s = resync_interval_s
        self._bucket = config_bucket(settings)
        self._current: AcceptedSnapshot | None = None
        self._floor = Floor()
        self._last_rejected: bytes | None = None
        self._changed = asyncio.Condition()
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> AcceptedSnapshot | None:
        """The snapshot in force (its apply succeeded), if any."""
        return self._current

    @property
    def version(self) -> int:
        return self._current.version if self._current else 0

    @property
    def floor(self) -> Floor:
        """The highest version ever verified here: nothing below it is accepted, and at it
        only the very same envelope."""
        return self._floor

    async def wait_current(self, newer_than: int = 0) -> AcceptedSnapshot:
        """Block until a snapshot with version > `newer_than` is in force."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > newer_than)
        assert self._current is not None
        return self._current

    async def _open(self, stack: AsyncExitStack) -> None:
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        self._task = self._tg.create_task(self._run(), name="config-watch")

    async def _close(self) -> None:
        assert self._task is not None
        # nats-py swallows a cancellation in places (request/consumer_info), so cancel
        # until the task has really ended; the task group then finishes with the stack.
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=0.1)

    async def _run(self) -> None:
        state_dir = self._settings.state_dir
        try:
            self._floor = await asyncio.to_thread(read_floor, state_dir)
        except (OSError, ValueError) as exc:
            # Damaged: the saved snapshot's version (below) is the floor then.
            log.error("config_floor_unreadable error=%s", exc)
        try:
            saved = await asyncio.to_thread(
                load_saved, state_dir, self._keys, network=self._settings.network, floor=self._floor
            )
        except ConfigRejected as exc:
            log.error("config_saved_rejected reason=%s", exc)
            await self._report(exc)
        except OSError as exc:
            log.error("config_saved_unreadable error=%s", exc)
        else:
            if saved is not None:
                log.info("config_saved_loaded version=%d", saved.version)
                await self._accept(saved)
        backoff = 0.2
        while self.is_open:
            try:
                kv = await self._key_value()
                await self._watch_once(kv)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("config_watch_failed error=%r retry_in_s=%.1f", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._resync_interval_s)

    async def _key_value(self) -> KeyValue:
        js = self._nc.jetstream()
        try:
            return await js.key_value(self._bucket)
        except BucketNotFoundError:
            if not self._settings.provision:
                raise
            log.info("config_bucket_created bucket=%s", self._bucket)
            return await js.create_key_value(
                api.KeyValueConfig(
                    bucket=self._bucket, history=5, replicas=self._settings.stream_replicas
                )
            )

    async def _watch_once(self, kv: KeyValue) -> None:
        """Watch until the resync deadline, then return so the caller re-creates the watch."""
        watcher = await kv.watch(SNAPSHOT_KEY)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resync_interval_s
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except NatsTimeoutError:
                    break  # the resync is due
                if entry is None:
                    continue  # "no more pending values" marker
                if entry.operation is not None or not entry.value:
                    log.warning("config_snapshot_deleted revision=%s", entry.revision)
                    continue
                await self._offer(entry.value)
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("config_watch_stop_failed error=%r", exc)
        try:
            entry = await kv.get(SNAPSHOT_KEY)
        except KeyNotFoundError:
            return
        if entry.value:
            await self._offer(entry.value)

    async def _offer(self, data: bytes) -> None:
        if self._current is not None and data == self._current.envelope:
            return
        if data == self._last_rejected:
            return
        try:
            snapshot, signer = check_snapshot(
                data, self._keys, network=self._settings.network, floor=self.floor
            )
        except ConfigRejected as exc:
            self._last_rejected = data
            log.warning("config_rejected reason=%s", exc)
            await self._report(exc)
            return
        await self._accept(AcceptedSnapshot(snapshot, data, signer, "network"))

    async def _accept(self, accepted: AcceptedSnapshot) -> None:
        """Verified: raise the floor, bring it into force, save it, then let the agent apply it."""
        if accepted.version > self._floor.version:
            floor = Floor(accepted.version, hashlib.sha256(accepted.envelope).hexdigest())
            try:
                await asyncio.to_thread(write_floor, self._settings.state_dir, floor)
            except OSError as exc:
                log.error("config_floor_save_failed version=%d error=%s", accepted.version, exc)
            self._floor = floor
        if accepted.origin == "network":
            try:
                await asyncio.to_thread(save_snapshot, self._settings.state_dir, accepted.envelope)
            except OSError as exc:
                log.error("config_save_failed version=%d error=%s", accepted.version, exc)
        log.info("config_applying version=%d origin=%s", accepted.version, accepted.origin)
        try:
            await self._apply(accepted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "config_apply_failed version=%d error=%r; it stays in force, serving nothing",
                accepted.version,
                exc,
            )
        else:
            log.info("config_applied version=%d", accepted.version)
        async with self._changed:
            self._current = accepted
            self._changed.notify_all()

    async def _report(self, exc: ConfigRejected) -> None:
        try:
            await self._on_rejected(exc)
        except Exception as report_exc:
            log.error("config_rejection_report_failed error=%r", report_exc)


async def publish_snapshot(nc: Client, bucket: str, envelope: bytes, *, replicas: int = 1) -> int:
    """Put a signed snapshot under the watched key (creating the bucket); returns the revision."""
    js = nc.jetstream()
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        kv = await js.create_key_value(
            api.KeyValueConfig(bucket=bucket, history=5, replicas=replicas)
        )
    revision: int = await kv.put(SNAPSHOT_KEY, envelope)
    return revision
