"""The network's side of the contract, as a client: submit a job, await its signed outcome.

Written from PROTOCOL.md alone, so it doubles as the reference for other clients: publish
the job with `Nats-Msg-Id`, read `rst.results.<job_id>` from the results stream, verify the
envelope against the body's `node_id`, and check `input_sha256` against the bytes sent.
"""

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.errors import SchemaError
from schemas.event import ErrorEvent
from schemas.job import Job
from schemas.limits import JOB_ID_PATTERN
from schemas.result import ResultBody
from schemas.snapshot import Snapshot
from schemas.stream import StreamBody
from worker.core.errors import JobFailed, NatsUnreachable, SignatureError
from worker.core.settings import Settings
from worker.core.signing import verify

log = logging.getLogger(__name__)
_JOB_ID = re.compile(JOB_ID_PATTERN)


async def connect(url: str, *, hint: str = "start it or set RESULTITY_NATS_URL") -> Client:
    """A short-lived client connection for a command: fails within seconds, saying why."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        # nats-py keeps retrying a refused first connect whatever the options say.
        async with asyncio.timeout(5):
            return await nats.connect(
                url.split(","), connect_timeout=2, allow_reconnect=False, error_cb=on_error
            )
    except Exception as exc:
        last = errors[-1] if errors else exc
        reason = str(last) or type(last).__name__
        raise NatsUnreachable(f"cannot reach NATS at {url} ({reason}); {hint}") from exc


@dataclass(frozen=True)
class Outcome:
    result: ResultBody
    envelope: bytes
    job_bytes: bytes


def new_job_id() -> str:
    return "job-" + secrets.token_hex(8)


async def current_snapshot(nc: Client, settings: Settings) -> Snapshot | None:
    """The snapshot in the config bucket, verified against the pinned authority keys."""
    try:
        kv = await nc.jetstream().key_value(f"{settings.subject_prefix}_config")
        entry = await kv.get("snapshot")
    except Exception:
        return None
    if entry.value is None:
        return None
    verified = verify(
        entry.value,
        authority_keys=settings.authority_key_bytes(),
        expect=EnvelopeType.CONFIG,
    )
    return validate(Snapshot, verified.body)


StreamSink = Callable[[StreamBody], None]


def stream_follower(
    sink: StreamSink, *, job_id: str, network: str
) -> Callable[[Msg], Awaitable[None]]:
    """A subscription callback for `rst.stream.<job_id>`: verifies each message and passes
    on those of the highest attempt seen (a job that runs again streams again from seq 0);
    messages that do not verify, or are for another job or network, are dropped."""
    highest = 0

    async def on_message(msg: Msg) -> None:
        nonlocal highest
        try:
            body = validate(StreamBody, verify(msg.data, expect=EnvelopeType.STREAM).body)
        except (SignatureError, SchemaError) as exc:
            log.debug("stream_message_skipped job_id=%s reason=%s", job_id, exc)
            return
        if body.job_id != job_id or body.network != network:
            return
        if body.attempt >= highest:
            highest = body.attempt
            sink(body)

    return on_message


async def cancel(nc: Client, settings: Settings, job_id: str) -> None:
    """Ask the node holding `job_id` to abort it (PROTOCOL.md v2, Cancellation)."""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r:.80}")
    await nc.publish(settings.subject("cancel", job_id), msgpack.packb({"job_id": job_id}))
    await nc.flush(timeout=5)


async def submit(
    nc: Client,
    settings: Settings,
    job: dict[str, Any],
    *,
    wait_s: float = 60.0,
    on_stream: StreamSink | None = None,
) -> Outcome:
    """Publish `job` and wait for its verified result; raises `JobFailed` on a final error.
    With `on_stream` (and `stream: true` in the job), partial output is passed on first."""
    data: bytes = msgpack.packb(job)
    validate(Job, job)
    job_id = job["job_id"]
    js = nc.jetstream()
    streamed = None
    if on_stream is not None:
        streamed = await nc.subscribe(
            settings.subject("stream", job_id),
            cb=stream_follower(on_stream, job_id=job_id, network=settings.network),
        )
    errors = await nc.subscribe(settings.subject("events", "error", "*"))
    results = await js.subscribe(
        settings.subject("results", job_id),
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        await js.publish(
            settings.subject("jobs", job["model_id"]), data, headers={"Nats-Msg-Id": job_id}
        )
        async with asyncio.timeout(wait_s):
            return await _outcome(results, errors, job_id, data, settings.network)
    finally:
        await results.unsubscribe()
        await errors.unsubscribe()
        if streamed is not None:
            await streamed.unsubscribe()


async def _outcome(results: Any, errors: Any, job_id: str, data: bytes, network: str) -> Outcome:
    """The first verified result that attests `data`, or `JobFailed` on the job's final
    error event. Anyone may publish on these subjects: what does not verify, is for another
    network or attests other bytes is skipped (and logged), never taken for the answer."""
    input_sha256 = hashlib.sha256(data).hexdigest()
    result_task: asyncio.Future[Any] | None = None
    error_task: asyncio.Future[Any] | None = None
    try:
        while True:
            if result_task is None:
                result_task = asyncio.ensure_future(results.next_msg(timeout=None))
            if error_task is None:
                error_task = asyncio.ensure_future(errors.next_msg(timeout=None))
            done, _ = await asyncio.wait(
                {result_task, error_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if result_task in done:
                envelope = result_task.result().data
                result_task = None
                body = _result_body(envelope, job_id, network, input_sha256)
                if body is not None:
                    return Outcome(body, envelope, data)
            if error_task in done:
                event = _error_event(error_task.result().data)
                error_task = None
                if (
                    event is not None
                    and event.job_id == job_id
                    and event.network == network
                    and not event.retryable
                ):
                    raise JobFailed(f"{event.code.value}: {event.message}", event.code)
    finally:
        # Also when cancelled (a deadline, a client gone): no read is left pending.
        await drop(result_task, error_task)


def _result_body(
    envelope: bytes, job_id: str, network: str, input_sha256: str
) -> ResultBody | None:
    try:
        body = validate(ResultBody, verify(envelope, expect=EnvelopeType.RESULT).body)
    except (SignatureError, SchemaError) as exc:
        log.warning("result_message_skipped job_id=%s reason=%s", job_id, exc)
        return None
    if body.job_id != job_id or body.network != network or body.input_sha256 != input_sha256:
        log.warning(
            "result_message_skipped job_id=%s reason=other job, network or input bytes", job_id
        )
        return None
    return body


def _error_event(data: bytes) -> ErrorEvent | None:
    """The signed error event in `data`, or None for anything else on the events subject
    (anyone may publish there: garbage is skipped, never raised)."""
    try:
        return validate(ErrorEvent, verify(data, expect=EnvelopeType.ERROR).body)
    except (SignatureError, SchemaError) as exc:
        log.debug("events_message_skipped reason=%s", exc)
        return None


async def drop(*tasks: "asyncio.Future[Any] | None") -> None:
    """Cancel pending reads and wait until they are done, their outcome consumed (nats-py
    turns a cancelled read on a closed connection into an error nobody would retrieve)."""
    pending = [t for t in tasks if t is not None and not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()
