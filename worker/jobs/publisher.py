"""Signs and publishes what the node says: results, error events, lifecycle events, heartbeats.

Results and events go to JetStream and are only reported published once the stream has
acknowledged them; `Nats-Msg-Id` makes a repeated publish (a job run twice) a no-op.
"""

import logging
import time
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.js import JetStreamContext

from schemas.envelope import EnvelopeType
from schemas.event import ErrorCode, LifecycleKind
from worker.core.settings import Settings
from worker.core.signing import NodeKey

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0


class Publisher:
    def __init__(self, nc: Client, js: JetStreamContext, key: NodeKey, settings: Settings) -> None:
        self._nc = nc
        self._js = js
        self._key = key
        self.node_id = key.node_id
        self._results = settings.subject("results")
        self._errors = settings.subject("events", "error", key.node_id)
        self._lifecycle = settings.subject("events", "node", key.node_id)
        self._heartbeat = settings.subject("nodes", key.node_id, "heartbeat")
        self._stream = settings.subject("stream")

    async def publish_result(self, job_id: str, body: dict[str, Any]) -> bool:
        """Sign and store a result; True if it was new, False if the stream had it already."""
        envelope = self._key.sign_bytes(EnvelopeType.RESULT, msgpack.packb(body))
        ack = await self._js.publish(
            f"{self._results}.{job_id}",
            envelope,
            timeout=PUBLISH_TIMEOUT_S,
            headers={"Nats-Msg-Id": job_id},
        )
        return not ack.duplicate

    async def publish_stream(self, job_id: str, body: dict[str, Any]) -> None:
        """Sign one partial-output message; core NATS, not stored (PROTOCOL.md v2)."""
        envelope = self._key.sign_bytes(EnvelopeType.STREAM, msgpack.packb(body))
        await self._nc.publish(f"{self._stream}.{job_id}", envelope)

    async def publish_error(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool,
        job_id: str | None = None,
        attempt: int | None = None,
        msg_id: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "node_id": self.node_id,
            "code": code.value,
            "message": message[:2048],
            "retryable": retryable,
            "at": time.time(),
        }
        if job_id is not None:
            body["job_id"] = job_id
        if attempt is not None:
            body["attempt"] = attempt
        envelope = self._key.sign_bytes(EnvelopeType.ERROR, msgpack.packb(body))
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self._js.publish(self._errors, envelope, timeout=PUBLISH_TIMEOUT_S, headers=headers)
        log.info(
            "error_published code=%s job_id=%s retryable=%s message=%s",
            code.value,
            job_id,
            retryable,
            message,
        )

    async def publish_lifecycle(self, kind: LifecycleKind, **details: Any) -> None:
        body = {"node_id": self.node_id, "kind": kind.value, "at": time.time(), "details": details}
        envelope = self._key.sign_bytes(EnvelopeType.EVENT, msgpack.packb(body))
        await self._js.publish(self._lifecycle, envelope, timeout=PUBLISH_TIMEOUT_S)
        log.info("lifecycle_published kind=%s", kind.value)

    async def try_lifecycle(self, kind: LifecycleKind, **details: Any) -> None:
        """Lifecycle events are best effort: a NATS outage must not stop the node."""
        try:
            await self.publish_lifecycle(kind, **details)
        except Exception as exc:
            log.warning("lifecycle_publish_failed kind=%s error=%r", kind.value, exc)

    async def heartbeat(self, **state: Any) -> None:
        body = {"node_id": self.node_id, "kind": "heartbeat", "at": time.time(), "details": state}
        await self._nc.publish(
            self._heartbeat, self._key.sign_bytes(EnvelopeType.EVENT, msgpack.packb(body))
        )
