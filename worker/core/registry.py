"""The node registry (PROTOCOL.md, "Admitted nodes"): the authority's signed admission and
revocation records in the KV bucket `<prefix>_nodes`, one key per node id, and the set of
admitted nodes a client, the gateway or a node reads from it.

Only the authority role may write the bucket (nats-server permissions); every record is
signed by an authority key all the same, so a record is worth what its signature is.
"""

import asyncio
import logging
import time
from collections.abc import Iterable

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from schemas.admission import Admission
from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.errors import SchemaError
from worker.core.errors import SignatureError
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify

log = logging.getLogger(__name__)


def registry_bucket(settings: Settings) -> str:
    return f"{settings.subject_prefix}_nodes"


def sign_admission(
    authority: NodeKey,
    node_id: str,
    network: str,
    *,
    expires_at: float | None = None,
    models: list[str] | None = None,
    now: float | None = None,
) -> bytes:
    body: dict[str, object] = {
        "node_id": node_id,
        "network": network,
        "admitted_at": time.time() if now is None else now,
    }
    if expires_at is not None:
        body["expires_at"] = float(expires_at)
    if models is not None:
        body["models"] = list(models)
    validate(Admission, body)
    return authority.sign(EnvelopeType.ADMISSION, body)


def sign_revocation(
    authority: NodeKey, node_id: str, network: str, *, previous: Admission | None = None
) -> bytes:
    now = time.time()
    body: dict[str, object] = {
        "node_id": node_id,
        "network": network,
        "admitted_at": previous.admitted_at if previous is not None else now,
        "revoked": True,
        "revoked_at": now,
    }
    validate(Admission, body)
    return authority.sign(EnvelopeType.ADMISSION, body)


def check_record(data: bytes, authority_keys: Iterable[bytes], key: str) -> Admission:
    """The record under registry key `key`, verified; raises `SignatureError`."""
    verified = verify(data, authority_keys=authority_keys, expect=EnvelopeType.ADMISSION)
    try:
        record = validate(Admission, verified.body)
    except SchemaError as exc:
        raise SignatureError(f"admission record for {key}: {exc}") from exc
    if record.node_id != key:
        raise SignatureError(f"admission record for {record.node_id} stored under {key}")
    return record


async def _bucket(nc: Client, settings: Settings, *, create: bool = False) -> KeyValue | None:
    js = nc.jetstream()
    try:
        return await js.key_value(registry_bucket(settings))
    except BucketNotFoundError:
        if not create:
            return None
        return await js.create_key_value(
            api.KeyValueConfig(
                bucket=registry_bucket(settings), history=5, replicas=settings.stream_replicas
            )
        )


async def publish_record(nc: Client, settings: Settings, node_id: str, envelope: bytes) -> int:
    """Put a signed record in the registry (creating the bucket: the authority's call)."""
    kv = await _bucket(nc, settings, create=True)
    assert kv is not None
    revision: int = await kv.put(node_id, envelope)
    log.info("registry_record_published node_id=%s revision=%d", node_id, revision)
    return revision


async def read_record(nc: Client, settings: Settings, node_id: str) -> Admission | None:
    """The verified record of `node_id`, or None (no bucket, no record, or one that does not
    verify: logged)."""
    kv = await _bucket(nc, settings)
    if kv is None:
        return None
    try:
        entry = await kv.get(node_id)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    try:
        return check_record(entry.value, settings.authority_key_bytes(), node_id)
    except SignatureError as exc:
        log.warning("registry_record_refused node_id=%s error=%s", node_id, exc)
        return None


class AdmittedNodes:
    """The nodes of one network the registry admits now: `key in admitted` (a node's raw
    public key) is a dict lookup, cheap enough to run on every message before verifying it.

    `load` reads the registry once; `follow` keeps reading its updates until cancelled."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._authority = settings.authority_key_bytes()
        self._records: dict[bytes, Admission] = {}
        self.loaded = asyncio.Event()
        self.changed = asyncio.Event()
        """Set whenever a record is taken; the reader clears it."""

    def __contains__(self, key: object) -> bool:
        record = self._records.get(key) if isinstance(key, bytes) else None
        return record is not None and record.admits(self._settings.network, time.time())

    def __len__(self) -> int:
        return len(self._records)

    def offer(self, key: str, data: bytes | None) -> None:
        """Take one registry entry: a verified record replaces the node's last one; a deleted
        entry or one that does not verify removes it (the node is not admitted)."""
        try:
            node = bytes.fromhex(key)
        except ValueError:
            return
        if not data:
            self._records.pop(node, None)
            return
        try:
            self._records[node] = check_record(data, self._authority, key)
        except SignatureError as exc:
            self._records.pop(node, None)
            log.warning("registry_record_refused node_id=%s error=%s", key, exc)

    async def load(self, nc: Client) -> "AdmittedNodes":
        """Read every current record once."""
        kv = await _bucket(nc, self._settings)
        if kv is not None:
            watcher = await kv.watchall()
            try:
                while (entry := await watcher.updates(timeout=10)) is not None:  # type: ignore[no-untyped-call]
                    self._take(entry)
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
        else:
            log.warning(
                "registry_missing bucket=%s: no node is admitted", registry_bucket(self._settings)
            )
        self.loaded.set()
        return self

    async def follow(self, nc: Client, *, retry_s: float = 2.0) -> None:
        """Read the registry and its updates until cancelled; `loaded` is set once the
        current records are in."""
        while True:
            try:
                kv = await _bucket(nc, self._settings)
                if kv is None:
                    self.loaded.set()
                    await asyncio.sleep(retry_s)
                    continue
                watcher = await kv.watchall()
                try:
                    while True:
                        entry = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
                        if entry is None:
                            self.loaded.set()
                        else:
                            self._take(entry)
                finally:
                    await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry_watch_failed error=%r retry_in_s=%.1f", exc, retry_s)
                await asyncio.sleep(retry_s)

    def _take(self, entry: KeyValue.Entry) -> None:
        self.offer(entry.key, None if entry.operation is not None else entry.value)
        self.changed.set()
