"""Switch claims: at most one node at a time switches to a given model on demand.

Two nodes that see the same starved model decide from the same consumer info, so both may
decide to switch to it in the same look; the node that switches first is not visible in
that info until its new runtime pulls (a cold start later). So a node claims the model
before it switches: it creates the model's key in the `<prefix>_switch` key-value bucket
(JetStream's create is atomic: one creator wins), holds it through the switch until its
first pull request on the model's consumer has reached the server, then deletes it. A
node whose claim is refused does not switch; by its next looks the claimant is pulling,
so the model is no longer starved. A claim left by a node that died mid-switch expires
with the bucket's `CLAIM_TTL_S`.
"""

import logging

from nats.aio.client import Client
from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from worker.core.settings import Settings

log = logging.getLogger(__name__)

CLAIM_TTL_S = 600.0
"""How long a claim lasts at most (the bucket's max age; the same on every node, since a
bucket's configuration is shared): longer than any switch's grace and cold start."""


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
