"""Signs and publishes what the node says: results, error events, lifecycle events, heartbeats.

Every body is a schema model (`ResultBody`, `ErrorEvent`, `LifecycleEvent`, `Heartbeat`),
validated before it is signed, with this node's `node_id` and `network` filled in here: a
value the runtime returned that the contract does not allow (a token id of 2^31, a 10 KB
device string) is `OutputMalformed`, never a signed result. So is an envelope larger than
the server's `max_payload`, which no retry could ever publish.

Results and events go to JetStream and are only reported published once the stream has
acknowledged them; `Nats-Msg-Id` makes a repeated publish (a job run twice) a no-op.
"""

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel

from schemas.codec import encode, packer, validate
from schemas.envelope import EnvelopeType
from schemas.errors import SchemaError
from schemas.event import MAX_MESSAGE_CHARS, ErrorCode, ErrorEvent, LifecycleEvent, LifecycleKind
from schemas.node import Heartbeat, NodeStatus
from schemas.result import ModelRef, ResultBody, RuntimeRef
from schemas.stream import StreamBody
from worker.core.deadlines import Deadlines
from worker.core.errors import OutputMalformed
from worker.core.settings import Settings
from worker.core.signing import NodeKey

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0

M = TypeVar("M", bound=BaseModel)


def checked(model: type[M], body: Mapping[str, Any]) -> M:
    """`body` as `model`, or `OutputMalformed` naming what the schema refuses."""
    try:
        return validate(model, dict(body))
    except SchemaError as exc:
        raise OutputMalformed(f"{model.__name__} refused before signing: {exc}") from exc


Landed = Callable[[bool | BaseException], None]
"""Told once how a stored result's publish ended: True (stored), False (the stream had it
already: a duplicate), or the error (`NoStreamResponseError`, `APIError`, `TimeoutError`)."""


def tell(landed: Landed, outcome: bool | BaseException) -> None:
    """Run a `Landed` callback; its error is logged, never raised into the PubAck path."""
    try:
        landed(outcome)
    except Exception:
        log.exception("result_landed_callback_failed")


class SealedResult(NamedTuple):
    job_id: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Attestation:
    """What a result attests besides its output: the model and the runtime that made it,
    validated once per runtime instead of once per result, and their maps for the wire."""

    model: ModelRef
    runtime: RuntimeRef
    wire: tuple[dict[str, Any], dict[str, Any]]

    @classmethod
    def of(cls, model: Mapping[str, Any], runtime: Mapping[str, Any]) -> "Attestation":
        """`OutputMalformed` when a value (from the runtime's `ready` frame, say) breaks
        the schema."""
        model_ref, runtime_ref = checked(ModelRef, model), checked(RuntimeRef, runtime)
        return cls(
            model_ref,
            runtime_ref,
            (
                model_ref.model_dump(mode="json", exclude_none=True),
                runtime_ref.model_dump(mode="json", exclude_none=True),
            ),
        )


def _pub_ack_outcome(msg: Msg) -> bool | BaseException:
    """What the stream answered to a result's publish: new (True), duplicate (False), or
    why it was not stored."""
    if (msg.headers or {}).get("Status"):  # 503: no stream takes the subject
        return nats.js.errors.NoStreamResponseError()
    try:
        reply = json.loads(msg.data)
    except ValueError as exc:
        return nats.errors.Error(f"PubAck is not JSON: {exc}")
    if not isinstance(reply, dict) or "error" in reply:
        return _api_error(reply.get("error") if isinstance(reply, dict) else None)
    return not reply.get("duplicate")


def _api_error(error: object) -> nats.js.errors.APIError:
    """The error nats-py would raise for this PubAck's `error` member."""
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        return nats.js.errors.APIError(description=f"malformed PubAck error: {error!r:.200}")
    try:
        nats.js.errors.APIError.from_error(error)
    except nats.js.errors.APIError as exc:
        return exc
    except TypeError:  # members nats-py does not know
        pass
    return nats.js.errors.APIError(code=error["code"], description=str(error.get("description")))


class Publisher:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        key: NodeKey,
        settings: Settings,
        *,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self._nc = nc
        self._js = js
        self._key = key
        self.node_id = key.node_id
        self.network = settings.network
        self._results = settings.subject("results")
        self._errors = settings.subject("events", "error", key.node_id)
        self._lifecycle = settings.subject("events", "node", key.node_id)
        self._heartbeat = settings.subject("nodes", key.node_id, "heartbeat")
        self._stream = settings.subject("stream")
        self._acks: Deadlines[int, Landed] = Deadlines(publish_timeout_s, self._timed_out)
        self._ack_inbox: str | None = None
        self._ack_ids = itertools.count()
        self._pack = packer()  # used on the event loop's thread only

    @property
    def acks_pending(self) -> int:
        """Results published whose PubAck has not landed (nor timed out) yet."""
        return len(self._acks)

    def _ours(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {**body, "node_id": self.node_id, "network": self.network}

    def _sign(self, typ: EnvelopeType, packed: bytes) -> bytes:
        envelope = self._key.sign_bytes(typ, packed)
        limit = self._nc.max_payload
        if limit and len(envelope) > limit:
            raise OutputMalformed(
                f"{typ.value} envelope is {len(envelope)} bytes, over the server's "
                f"max_payload of {limit}"
            )
        return envelope

    def _seal(self, typ: EnvelopeType, body: BaseModel) -> bytes:
        return self._sign(typ, encode(body))

    def seal_result(self, attestation: Attestation, fields: Mapping[str, Any]) -> SealedResult:
        """A signed result from the pipeline's fields (all of `ResultBody` but the node's
        identity and the attested model and runtime, filled in here). The whole body is
        validated first: `OutputMalformed` when the runtime's values break the schema or
        the envelope is over the server's `max_payload`.

        Encoded from the validated map itself, not from a model dump: the schema's types
        are strict (nothing is converted) and `fields` holds no None, so the bytes are
        those `encode(ResultBody)` gives, at a third of the cost. Logprobs (where the
        schema fills in defaults) take the model dump."""
        body: dict[str, Any] = dict.fromkeys(("job_id", "node_id", "network", "model", "runtime"))
        body.update(fields)  # in the schema's order, and never over what is set next:
        body["node_id"], body["network"] = self.node_id, self.network
        body["model"], body["runtime"] = attestation.model, attestation.runtime
        validated = checked(ResultBody, body)
        if validated.output.logprobs is None:
            body["model"], body["runtime"] = attestation.wire
            packed = self._pack(body)
        else:
            packed = encode(validated)
        return SealedResult(validated.job_id, self._sign(EnvelopeType.RESULT, packed))

    async def publish_result(self, result: SealedResult) -> bool:
        """Store a signed result; True if it was new, False if the stream had it already.
        A NATS error (`NoStreamResponseError`, `APIError`, `TimeoutError` after
        `publish_timeout_s`) when the stream did not store it."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def landed(outcome: bool | BaseException) -> None:
            if stored.done():
                return
            if isinstance(outcome, BaseException):
                stored.set_exception(outcome)
            else:
                stored.set_result(outcome)

        await self.store_result(result, landed)
        return await stored

    async def store_result(self, result: SealedResult, landed: Landed) -> None:
        """Publish a signed result; `landed` is told once when the stream has answered (or
        `publish_timeout_s` passed), as `publish_result` returns or raises: a callback, not
        a future per result. A NATS error here when it was not sent (`landed` is not told)."""
        # The PubAck comes to this publisher's own inbox, with one deadline timer for all
        # results: no request, timer and wait_for per result (as `js.publish` makes), no
        # random token and PubAck object (as `publish_async` makes).
        if self._ack_inbox is None:
            self._ack_inbox = self._nc.new_inbox()  # set first: one subscription only
            await self._nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_ack)
        ack_id = next(self._ack_ids)
        # Watched before the publish: its PubAck may land while the publish flushes.
        self._acks.watch(ack_id, landed)
        try:
            await self._nc.publish(
                f"{self._results}.{result.job_id}",
                result.envelope,
                reply=f"{self._ack_inbox}.{ack_id}",
                headers={"Nats-Msg-Id": result.job_id},
            )
        except Exception:
            if self._acks.pop(ack_id) is None:
                # The publish outlived `publish_timeout_s`: `landed` was told already (one
                # outcome per result, never a second one here).
                return
            raise
        except BaseException:
            self._acks.pop(ack_id)
            raise

    def _timed_out(self, ack_id: int, landed: Landed) -> None:
        tell(landed, nats.errors.TimeoutError(f"no PubAck within {self._acks.timeout_s}s"))

    async def _on_ack(self, msg: Msg) -> None:
        """A PubAck (or the server's refusal) for one stored result."""
        try:
            landed = self._acks.pop(int(msg.subject.rpartition(".")[2]))
        except ValueError:
            return
        if landed is not None:
            tell(landed, _pub_ack_outcome(msg))

    async def publish_stream(self, fields: Mapping[str, Any]) -> None:
        """Sign one partial-output message, this node's identity filled in and the body
        validated first; core NATS, not stored (PROTOCOL.md v2)."""
        body = checked(StreamBody, self._ours(fields))
        envelope = self._seal(EnvelopeType.STREAM, body)
        await self._nc.publish(f"{self._stream}.{body.job_id}", envelope)

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
        fields: dict[str, Any] = {
            "code": code.value,
            "message": message[:MAX_MESSAGE_CHARS],
            "retryable": retryable,
            "at": time.time(),
        }
        if job_id is not None:
            fields["job_id"] = job_id
        if attempt is not None:
            fields["attempt"] = attempt
        event = checked(ErrorEvent, self._ours(fields))
        envelope = self._seal(EnvelopeType.ERROR, event)
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
        event = checked(
            LifecycleEvent, self._ours({"kind": kind.value, "at": time.time(), "details": details})
        )
        await self._js.publish(
            self._lifecycle, self._seal(EnvelopeType.EVENT, event), timeout=PUBLISH_TIMEOUT_S
        )
        log.info("lifecycle_published kind=%s", kind.value)

    async def try_lifecycle(self, kind: LifecycleKind, **details: Any) -> None:
        """Lifecycle events are best effort: a NATS outage must not stop the node."""
        try:
            await self.publish_lifecycle(kind, **details)
        except Exception as exc:
            log.warning("lifecycle_publish_failed kind=%s error=%r", kind.value, exc)

    async def heartbeat(self, status: NodeStatus) -> None:
        beat = checked(Heartbeat, self._ours({"at": time.time(), "details": status}))
        await self._nc.publish(self._heartbeat, self._seal(EnvelopeType.EVENT, beat))
