"""The network's side of the contract, as a client: submit a job, await its signed outcome.

Written from PROTOCOL.md alone, so it doubles as the reference for other clients: publish
the job with `Nats-Msg-Id`, read `rst.results.<job_id>` from the results stream, verify the
envelope against the body's `node_id`, and check `input_sha256` against the bytes sent.
"""

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas.codec import unpack_map, validate
from schemas.envelope import EnvelopeType, RawEnvelope, unpack_envelope
from schemas.errors import SchemaError
from schemas.event import ErrorEvent
from schemas.job import Job
from schemas.limits import JOB_ID_PATTERN
from schemas.result import ResultBody
from schemas.snapshot import Snapshot
from schemas.stream import StreamBody
from worker.core.credentials import connect_options
from worker.core.errors import JobFailed, NatsUnreachable, SignatureError
from worker.core.registry import AdmittedNodes
from worker.core.settings import Settings
from worker.core.signing import verify

log = logging.getLogger(__name__)
_JOB_ID = re.compile(JOB_ID_PATTERN)


async def connect(
    target: Settings | str, *, hint: str = "start it or set RESULTITY_NATS_URL"
) -> Client:
    """A short-lived client connection for a command: fails within seconds, saying why.
    `target`: the settings (URL, credentials, CA), or a bare URL (no credentials)."""
    errors: list[Exception] = []
    if isinstance(target, Settings):
        url, options = target.nats_url, connect_options(target)
    else:
        url, options = target, {}

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    try:
        # nats-py keeps retrying a refused first connect whatever the options say.
        async with asyncio.timeout(5):
            return await nats.connect(
                url.split(","),
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=on_error,
                **options,
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
    """The snapshot in the config bucket, verified against the pinned authority keys, if it
    is for the settings' network."""
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
    snapshot = validate(Snapshot, verified.body)
    if snapshot.network != settings.network:
        log.warning(
            "snapshot_of_another_network network=%s ours=%s", snapshot.network, settings.network
        )
        return None
    return snapshot


StreamSink = Callable[[StreamBody], None]
Signers = Container[bytes] | None
"""The node keys whose results, stream messages and error events count (the admitted
nodes), or None: any node's (a network without a registry, `admission_required` off)."""


def stream_follower(
    sink: StreamSink, *, job_id: str, network: str, signers: Signers = None
) -> Callable[[StreamBody], None]:
    """A filter for `job_id`'s verified stream messages: passes on those of the highest
    attempt seen (a job that runs again streams again from seq 0) to `sink`; messages for
    another job or network are dropped."""
    highest = 0

    def on_body(body: StreamBody) -> None:
        nonlocal highest
        if body.job_id != job_id or body.network != network:
            return
        if body.attempt >= highest:
            highest = body.attempt
            sink(body)

    return on_body


async def signers_for(nc: Client, settings: Settings) -> Signers:
    """The admitted nodes of the settings' network, read once; None when not required."""
    if not settings.admission_required:
        return None
    return await AdmittedNodes(settings).load(nc)


@dataclass
class JobMail:
    """What the router hands one waiting job: its final error events, its stream."""

    job_id: str
    on_stream: Callable[[StreamBody], None] | None
    errors: "asyncio.Queue[ErrorEvent]" = field(default_factory=asyncio.Queue)


class Router:
    """The network's error events and stream messages on one subscription each, routed to
    the waiting jobs by job id: a message is looked at once, whoever waits. What a message
    costs, cheapest check first: its envelope's shape and signer (a key not in `signers` is
    dropped unverified), then whether anyone waits for its job (the stream subject names
    the job; an error event's body does), and only then its signature.

    `stream_jobs`: the job-id token of the stream subscription (`*`: every job, for a
    gateway; one job id, for a one-shot client)."""

    def __init__(
        self, nc: Client, settings: Settings, signers: Signers, *, stream_jobs: str = "*"
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.signers = signers
        self._stream_jobs = stream_jobs
        self._waiting: dict[str, JobMail] = {}
        self._subs: list[Any] = []
        self.examined = 0
        """Messages looked at (each one once, however many jobs wait)."""

    async def start(self) -> "Router":
        self._subs = [
            await self.nc.subscribe(
                self.settings.subject("events", "error", "*"), cb=self._on_error
            ),
            await self.nc.subscribe(
                self.settings.subject("stream", self._stream_jobs), cb=self._on_stream
            ),
        ]
        return self

    async def aclose(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @contextlib.contextmanager
    def mail(
        self, job_id: str, on_stream: Callable[[StreamBody], None] | None = None
    ) -> Iterator[JobMail]:
        mail = JobMail(job_id, on_stream)
        self._waiting[job_id] = mail
        try:
            yield mail
        finally:
            if self._waiting.get(job_id) is mail:
                del self._waiting[job_id]

    def _trusted(self, data: bytes, typ: EnvelopeType) -> RawEnvelope | None:
        try:
            env = unpack_envelope(data)
        except SchemaError:
            return None
        if env.typ is not typ or (self.signers is not None and env.key not in self.signers):
            return None
        return env

    async def _on_error(self, msg: Msg) -> None:
        self.examined += 1
        env = self._trusted(msg.data, EnvelopeType.ERROR)
        if env is None:
            return
        try:
            job_id = unpack_map(env.body).get("job_id")
        except SchemaError:
            return
        mail = self._waiting.get(job_id) if isinstance(job_id, str) else None
        if mail is None:
            return
        event = _error_event(msg.data, self.signers)
        if event is not None and event.job_id == mail.job_id:
            mail.errors.put_nowait(event)

    async def _on_stream(self, msg: Msg) -> None:
        self.examined += 1
        mail = self._waiting.get(msg.subject.rpartition(".")[2])
        if mail is None or mail.on_stream is None:
            return
        if self._trusted(msg.data, EnvelopeType.STREAM) is None:
            return
        try:
            verified = verify(msg.data, expect=EnvelopeType.STREAM, signers=self.signers)
            body = validate(StreamBody, verified.body)
        except (SignatureError, SchemaError) as exc:
            log.debug("stream_message_skipped job_id=%s reason=%s", mail.job_id, exc)
            return
        if body.job_id == mail.job_id and body.network == self.settings.network:
            mail.on_stream(body)


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
    router: Router | None = None,
) -> Outcome:
    """Publish `job` and wait for its verified result; raises `JobFailed` on a final error.
    With `on_stream` (and `stream: true` in the job), partial output is passed on first.
    Only admitted nodes' messages count (`settings.admission_required`). A caller that
    submits many jobs passes its `router` (started); otherwise one is made for this job."""
    data: bytes = msgpack.packb(job)
    validate(Job, job)
    job_id = job["job_id"]
    js = nc.jetstream()
    own = router is None
    if router is None:
        router = await Router(
            nc, settings, await signers_for(nc, settings), stream_jobs=job_id
        ).start()
    follower = None
    if on_stream is not None:
        follower = stream_follower(
            on_stream, job_id=job_id, network=settings.network, signers=router.signers
        )
    try:
        with router.mail(job_id, follower) as mail:
            results = await js.subscribe(
                settings.subject("results", job_id),
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            try:
                await js.publish(
                    settings.subject("jobs", job["model_id"]),
                    data,
                    headers={"Nats-Msg-Id": job_id},
                )
                async with asyncio.timeout(wait_s):
                    return await _outcome(results, mail, data, settings.network, router.signers)
            finally:
                await results.unsubscribe()
    finally:
        if own:
            await router.aclose()


async def _outcome(
    results: Any, mail: JobMail, data: bytes, network: str, signers: Signers
) -> Outcome:
    """The first verified result that attests `data`, or `JobFailed` on the job's final
    error event. Anyone allowed to publish on these subjects may: what is not from an
    admitted node, does not verify, is for another network or attests other bytes is
    skipped (and logged), never taken for the answer."""
    job_id = mail.job_id
    input_sha256 = hashlib.sha256(data).hexdigest()
    result_task: asyncio.Future[Any] | None = None
    error_task: asyncio.Future[Any] | None = None
    try:
        while True:
            if result_task is None:
                result_task = asyncio.ensure_future(results.next_msg(timeout=None))
            if error_task is None:
                error_task = asyncio.ensure_future(mail.errors.get())
            done, _ = await asyncio.wait(
                {result_task, error_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if result_task in done:
                envelope = result_task.result().data
                result_task = None
                body = _result_body(envelope, job_id, network, input_sha256, signers)
                if body is not None:
                    return Outcome(body, envelope, data)
            if error_task in done:
                event: ErrorEvent = error_task.result()
                error_task = None
                if event.network == network and not event.retryable:
                    raise JobFailed(f"{event.code.value}: {event.message}", event.code)
    finally:
        # Also when cancelled (a deadline, a client gone): no read is left pending.
        await drop(result_task, error_task)


def _result_body(
    envelope: bytes, job_id: str, network: str, input_sha256: str, signers: Signers = None
) -> ResultBody | None:
    try:
        verified = verify(envelope, expect=EnvelopeType.RESULT, signers=signers)
        body = validate(ResultBody, verified.body)
    except (SignatureError, SchemaError) as exc:
        log.warning("result_message_skipped job_id=%s reason=%s", job_id, exc)
        return None
    if body.job_id != job_id or body.network != network or body.input_sha256 != input_sha256:
        log.warning(
            "result_message_skipped job_id=%s reason=other job, network or input bytes", job_id
        )
        return None
    return body


def _error_event(data: bytes, signers: Signers = None) -> ErrorEvent | None:
    """The signed error event in `data`, or None for anything else on the events subject
    (garbage and strangers' events are skipped, never raised)."""
    try:
        verified = verify(data, expect=EnvelopeType.ERROR, signers=signers)
        return validate(ErrorEvent, verified.body)
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
