"""Intake: keeps pull requests open on the model's durable consumer and admits each job.

nats-py's `fetch()` issues one request at a time and, after a server restart, can wait on a
request the server no longer knows. `JobSource` instead keeps pull requests outstanding
within a credit (`max_in_flight` minus the jobs in flight), asks the server for idle
heartbeats, and forgets every outstanding request when a heartbeat is missed or the
connection comes back, so pulling always resumes.
"""

import asyncio
import enum
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.codec import decode
from schemas.errors import SchemaError
from schemas.job import Job
from schemas.limits import JOB_ID_PATTERN
from worker.core.errors import BadRequest, DeadlineExceeded, JobRejected, NodeError, UnknownModel
from worker.jobs.states import Phase
from worker.runtime.api import Completion

log = logging.getLogger(__name__)

_JOB_ID = re.compile(JOB_ID_PATTERN)
PULL_EXPIRES_S = 30.0
PULL_HEARTBEAT_S = 1.0
MIN_PULL = 16
UNSUBSCRIBE_FLUSH_S = 5.0


@dataclass(slots=True, eq=False)
class InFlight:
    """A job message between its delivery and its ack, nak or term: one record per job."""

    msg: Msg
    attempt: int
    stream_seq: int
    input_sha256: str
    received: float
    job: Job | None = None
    phase: Phase = Phase.ADMITTED
    """Where the job is; only `Pipeline._apply` moves it (`states.transition` decides)."""
    reason: NodeError | None = None
    """Its outcome once decided before it runs to the end: a refusal, a cancel, a deadline,
    a runtime failure being reported."""
    progress_at: float = field(default=0.0)
    lease_until: float | None = None
    """Wall time after which in-progress acks stop: the job's run deadline."""
    answer: "asyncio.Future[Completion] | None" = None
    """The runtime's outcome for the job, once its request is submitted; cancelling it
    aborts the request."""
    task: "asyncio.Task[None] | None" = None
    """A task that ends the job (its error event, a result publish retried): cancelled if
    the job is handed back meanwhile."""
    deadline_timer: asyncio.TimerHandle | None = None

    @property
    def job_id(self) -> str | None:
        """The job's id; for a payload that did not decode, its `Nats-Msg-Id` if well formed."""
        if self.job is not None:
            return self.job.job_id
        header = (self.msg.headers or {}).get("Nats-Msg-Id")
        return header if header and _JOB_ID.fullmatch(header) else None


def delivery(msg: Msg) -> tuple[int, int]:
    """How many times the job was delivered, and its stream sequence, from the delivery's
    ack subject. The common form (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<time>.<pending>`) is read here; any other goes through nats-py's
    `Msg.metadata` (which also builds a timestamp and objects this does not need)."""
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        try:
            return int(tokens[4]), int(tokens[5])
        except ValueError:
            pass
    meta = msg.metadata
    return meta.num_delivered, meta.sequence.stream if meta.sequence else 0


def admit(
    msg: Msg, *, model_id: str, max_bytes: int, now: float
) -> tuple[InFlight, JobRejected | None]:
    """Decode and check one delivered job; a rejection is final (the job is terminated).

    The record is returned either way: a rejected job still needs its error event, with
    its `job_id` where the payload had a valid one."""
    delivered, stream_seq = delivery(msg)
    record = InFlight(
        msg=msg,
        attempt=delivered or 1,
        stream_seq=stream_seq,
        input_sha256=hashlib.sha256(msg.data).hexdigest(),
        received=time.monotonic(),
    )
    record.progress_at = record.received
    try:
        job = decode(Job, msg.data, max_bytes=max_bytes)
    except SchemaError as exc:
        return record, BadRequest(f"malformed job: {exc}")
    record.job = job
    record.lease_until = job.deadline
    if job.model_id != msg.subject.rsplit(".", 1)[-1]:
        return record, UnknownModel(
            f"job model_id {job.model_id!r} does not match its subject {msg.subject!r}"
        )
    if job.model_id != model_id:
        return record, UnknownModel(f"this node serves {model_id!r}, not {job.model_id!r}")
    if job.deadline is not None and job.deadline < now:
        return record, DeadlineExceeded(f"deadline {job.deadline:.3f} passed before the job ran")
    return record, None


class SourceState(enum.Enum):
    NEW = "new"
    PULLING = "pulling"
    STOPPED = "stopped"


class JobSource:
    """Pull requests on one durable consumer, bounded by a credit the caller computes."""

    def __init__(
        self,
        nc: Client,
        *,
        stream: str,
        consumer: str,
        credit: Callable[[], int],
        on_message: Callable[[Msg], Awaitable[None]],
        on_consumer_lost: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._credit = credit
        self._on_message = on_message
        self._on_consumer_lost = on_consumer_lost
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._outstanding = 0
        self._last_seen = time.monotonic()
        self._wake = asyncio.Event()
        self._ticker: asyncio.TimerHandle | None = None
        self.state = SourceState.NEW
        self.asked = asyncio.Event()
        """Set once a pull request was sent (the server has it once the connection is
        flushed)."""

    async def run(self) -> None:
        """Pull until `stop()`; the caller runs this in its task group. A source runs once:
        stopped (even before it ran) means stopped."""
        if self.state is not SourceState.NEW:
            return
        self._sub = await self._nc.subscribe(self._inbox, cb=self._deliver)
        if self.state is SourceState.NEW:  # not stopped while subscribing
            self.state = SourceState.PULLING
        # One repeating tick wakes the loop at least every PULL_HEARTBEAT_S (no timer per
        # wake: under load it wakes on every turn that settled a job).
        self._tick()
        try:
            while self.state is SourceState.PULLING:
                await self._pull_if_due()
                self._wake.clear()
                await self._wake.wait()
                self._check_liveness()
        finally:
            if self._ticker is not None:
                self._ticker.cancel()
            self.state = SourceState.STOPPED
            sub, self._sub = self._sub, None
            if sub is not None and not self._nc.is_closed:
                try:
                    # Once the server has our UNSUB, its pull requests to this inbox have no
                    # interest left: it delivers them nothing more (the jobs stay queued). A
                    # drain, not an unsubscribe (which discards them), still gives what was
                    # delivered before to `_deliver`, which hands it back at once.
                    async with asyncio.timeout(UNSUBSCRIBE_FLUSH_S):
                        await sub.drain()  # type: ignore[no-untyped-call]
                except Exception as exc:
                    log.debug("pull_unsubscribe_failed error=%r", exc)

    def _tick(self) -> None:
        self._wake.set()
        self._ticker = asyncio.get_running_loop().call_later(PULL_HEARTBEAT_S, self._tick)

    def stop(self) -> None:
        """Stop asking for jobs; a message already on its way is handed back (nak'ed)."""
        self.state = SourceState.STOPPED
        self._wake.set()

    def wake(self) -> None:
        """Credit grew (jobs finished): pull again without waiting for the tick."""
        self._wake.set()

    def reset(self) -> None:
        """Forget outstanding requests (the server lost them: reconnect, restart)."""
        if self._outstanding:
            log.info("pull_requests_reset outstanding=%d", self._outstanding)
        self._outstanding = 0
        self._last_seen = time.monotonic()
        self._wake.set()

    async def _pull_if_due(self) -> None:
        if not self._nc.is_connected:
            return
        credit = self._credit()
        want = credit - self._outstanding
        # Small pulls cost a round trip each: wait until MIN_PULL is free, unless the whole
        # credit is smaller than that.
        if want <= 0 or want < min(MIN_PULL, credit):
            return
        request = {
            "batch": want,
            "expires": int(PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
        }
        try:
            await self._nc.publish(self._api, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:
            log.warning("pull_request_failed error=%r", exc)
            return
        self._outstanding += want
        self._last_seen = time.monotonic()
        self.asked.set()

    def _check_liveness(self) -> None:
        silent = time.monotonic() - self._last_seen
        if self._outstanding and silent > 3 * PULL_HEARTBEAT_S:
            log.warning("pull_heartbeat_missed silent_s=%.1f", silent)
            self.reset()

    async def _deliver(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        if msg.headers and msg.headers.get("Status"):
            await self._status(msg)
            return
        self._outstanding = max(0, self._outstanding - 1)
        if self.state is not SourceState.PULLING:
            await self._hand_back(msg)
            return
        await self._on_message(msg)

    async def _hand_back(self, msg: Msg) -> None:
        try:
            await msg.nak()
        except Exception as exc:
            log.debug("nak_failed error=%r", exc)

    async def _status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return
        pending = headers.get("Nats-Pending-Messages")
        if status in {"408", "409"} and pending is not None:
            self._outstanding = max(0, self._outstanding - int(pending))
        elif status in {"404", "408", "409"}:
            self._outstanding = 0
        description = headers.get("Description", "")
        if status == "409" and "Consumer Deleted" in description:
            log.warning("consumer_deleted description=%s", description)
            self._outstanding = 0
            if self._on_consumer_lost is not None:
                await self._on_consumer_lost()
        elif status not in {"404", "408"}:
            log.info("pull_status status=%s description=%s", status, description)
        self._wake.set()
