"""Switch claims: at most one node at a time switches to a given model on demand.

Two nodes that see the same starved model decide from the same consumer info, so both may
decide to switch to it in the same look; the node that switches first is not visible in
that info until its new runtime pulls (a cold start later). So a node claims the model
before it switches: it creates the model's key in the `<prefix>_switch` key-value bucket
(JetStream's create is atomic: one creator wins), holds it through the switch until its
first pull request on the model's consumer has reached the server, then deletes it. A
node whose claim is refused does not switch; by its next looks the claimant is pulling,
so the model is no longer starved. A claim left by a node killed mid-switch is cleared
when that node starts again (`clear_mine`), or expires with the bucket's `CLAIM_TTL_S`.
"""

import logging

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from worker.core.settings import Settings

log = logging.getLogger(__name__)

CLAIM_TTL_S = 120.0
"""How long a claim lasts at most (the bucket's max age; the same on every node, since a
bucket's configuration is shared). A switch longer than that (a long grace, a slow cold
start) only risks a second node switching to the same model; a shorter life bounds how
long a node that died for good mid-switch keeps a starved model from the others."""


def claims_bucket(settings: Settings) -> str:
    return f"{settings.subject_prefix}_switch"


class SwitchClaims:
    """This node's claims on models it is switching to."""

    def __init__(self, nc: Client, settings: Settings, node_id: str) -> None:
        self._nc = nc
        self._settings = settings
        self._node_id = node_id
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._nc.jetstream()
            bucket = claims_bucket(self._settings)
            try:
                self._kv = await js.key_value(bucket)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(
                    api.KeyValueConfig(
                        bucket=bucket,
                        history=1,
                        ttl=CLAIM_TTL_S,
                        replicas=self._settings.stream_replicas,
                    )
                )
        return self._kv

    async def claim(self, model_id: str) -> bool:
        """True when this node now holds `model_id`'s claim; False when another node does.
        A claim that cannot be made at all (NATS trouble) is an error for the caller."""
        kv = await self._bucket()
        try:
            await kv.create(model_id, self._node_id.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def release(self, model_id: str) -> None:
        """Give the claim up; a failure only leaves it to expire."""
        try:
            kv = await self._bucket()
            await kv.delete(model_id)
        except Exception as exc:
            log.warning("switch_claim_release_failed model=%s error=%r", model_id, exc)

    async def clear_mine(self) -> int:
        """Delete the claims this node left (killed mid-switch, restarted); returns how many.
        Each delete is conditional on the revision read, so a claim another node took
        meanwhile stays."""
        kv = await self._bucket()
        try:
            keys = await kv.keys()
        except NoKeysError:
            return 0
        cleared = 0
        for key in keys:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value == self._node_id.encode():
                try:
                    await kv.delete(key, last=entry.revision)
                except KeyWrongLastSequenceError:
                    continue
                cleared += 1
        if cleared:
            log.info("switch_claims_cleared count=%d", cleared)
        return cleared
