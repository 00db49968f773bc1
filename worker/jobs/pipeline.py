"""The job pipeline for one served model: intake -> runtime, one request per job -> signed
outcome, each job settled as soon as it completes.

Every delivered job ends in exactly one of three ways, and only after what the network must
see is stored in JetStream:

    result        sign, publish with `Nats-Msg-Id: <job_id>`, wait for the stream's ack, ack
    retryable     publish a retryable error event, nak with a growing delay (last delivery:
                  publish a final error event and term instead)
    final error   publish a signed error event, term (bad input, cancelled, deadline passed)

If a publish fails the job is nak'ed, never acked: it runs again and the stream's duplicate
window turns the repeated result into a no-op.

The runtime is kept supplied with up to `runtime_max_active` requests (0: what the engine
reports it runs concurrently; the others wait in a queue); results come back in completion
order. No task runs per job: a job's request is submitted from the intake callback (or when
a slot frees), the runtime completes its future, `_answered` hands a completion to the one
results task (validate, sign, publish) and a failure to a task of its own, and the stream's
PubAcks settle jobs through the one ack task. While a job runs:
- `stream: true` jobs publish signed `stream` envelopes on `rst.stream.<job_id>`, coalesced
  by one publisher task, so the frame reader never waits on NATS;
- a cancel on `rst.cancel.<job_id>` (also one that arrived up to `EARLY_CANCEL_S` before
  the job) aborts the request, publishes `CANCELLED` and terms the job;
- its `deadline` aborts the request (`DEADLINE_EXCEEDED`);
- in-progress acks keep its lease, but never past its run deadline.
"""

import asyncio
import enum
import functools
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.job import Job
from schemas.limits import JOB_ID_PATTERN
from worker.core.errors import (
    Cancelled,
    DeadlineExceeded,
    NodeError,
    OutputMalformed,
    RuntimeFailure,
    RuntimeStartError,
    error_code,
)
from worker.core.metrics import Metrics
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.jobs.intake import InFlight, JobSource, admit
from worker.jobs.provision import consumer_name, ensure_consumer
from worker.jobs.publisher import Attestation, Publisher, SealedResult
from worker.runtime.api import Completion, Partial, Runtime, RuntimeFacts, WorkItem

log = logging.getLogger(__name__)

NAK_BASE_DELAY_S = 1.0
NAK_MAX_DELAY_S = 60.0
PUBLISH_ATTEMPTS = 3
EARLY_CANCEL_S = 60.0
MAX_EARLY_CANCELS = 10_000
DEFAULT_MAX_ACTIVE = 64
LEASE_GRACE_S = 5.0
_JOB_ID = re.compile(JOB_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Serving:
    """What the results of this pipeline attest: the model, the image, the snapshot."""

    model_id: str
    model_version: str
    model_sha256: str
    image: str
    config_version: int


class Settle(enum.Enum):
    """How a job that did not succeed is handed back (a success is acked by the ack task)."""

    NAK = "nak"
    TERM = "term"


def nak_delay(attempt: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_BASE_DELAY_S * 2.0 ** (attempt - 1))


def runtime_payload(job: Job) -> dict[str, Any]:
    """The `request` map of a job's `submit` frame: its prompt, token ids or messages, and
    its parameters."""
    payload: dict[str, Any]
    if job.prompt is not None:
        payload = {"prompt": job.prompt}
    elif job.prompt_token_ids is not None:
        payload = {"prompt_token_ids": job.prompt_token_ids}
    else:
        payload = job.model_dump(include={"messages"}, exclude_none=True)
    payload["params"] = job.params.model_dump(exclude_none=True)
    return payload


def extends_lease(record: InFlight, now: float) -> bool:
    """Whether an in-progress ack may still extend this job's lease (wall time `now`)."""
    return record.lease_until is None or now < record.lease_until


@dataclass(eq=False)
class _Stream:
    """One streaming job's output on its way to NATS."""

    record: InFlight
    pending_ids: list[int] = field(default_factory=list)
    pending_text: list[str] = field(default_factory=list)
    sent_ids: int = 0
    sent_text: list[str] = field(default_factory=list)
    seq: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: bool = False


class Pipeline(AsyncResource):
    """Consumes one model's jobs until drained. `async with` starts it; `drain()` stops it."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        publisher: Publisher,
        runtime: Runtime,
        serving: Serving,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self._nc = nc
        self._settings = settings
        self._publisher = publisher
        self._runtime = runtime
        self.serving = serving
        self.metrics = metrics or Metrics()
        self._in_flight: set[InFlight] = set()
        self._by_job: dict[str, InFlight] = {}
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tg: asyncio.TaskGroup | None = None
        self.max_active = DEFAULT_MAX_ACTIVE
        self._running: set[InFlight] = set()
        """Jobs holding a runtime slot (their request is with the runtime)."""
        self._waiting: deque[InFlight] = deque()
        """Admitted jobs waiting for a slot, oldest first (submitted when one frees)."""
        self._dirty: dict[InFlight, _Stream] = {}
        self._streams: dict[InFlight, _Stream] = {}
        self._stream_wake = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._attestation: tuple[RuntimeFacts, Attestation] | None = None
        self._answers: list[tuple[InFlight, Completion, float, float]] = []
        self._answers_wake = asyncio.Event()
        self._acks_due: list[InFlight] = []
        self._ack_wake = asyncio.Event()
        self.draining = False
        self.completed = 0
        self._source = JobSource(
            nc,
            stream=settings.stream("JOBS"),
            consumer=consumer_name(settings, serving.model_id),
            credit=self._credit,
            on_message=self._on_message,
            on_consumer_lost=self._recreate_consumer,
        )

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _credit(self) -> int:
        return self._settings.max_in_flight - len(self._in_flight)

    async def _open(self, stack: AsyncExitStack) -> None:
        self.max_active = self._settings.runtime_max_active or self._engine_max_active()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        cancel_sub: Subscription = await self._nc.subscribe(
            self._settings.subject("cancel", "*"), cb=self._on_cancel
        )
        stack.push_async_callback(self._unsubscribe, cancel_sub)
        for coro, name in (
            (self._source.run(), "intake"),
            (self._progress_loop(), "progress"),
            (self._stream_loop(), "stream"),
            (self._results_loop(), "results"),
            (self._ack_loop(), "ack"),
        ):
            self._background.append(self._tg.create_task(coro, name=name))
        log.info("pipeline_started model=%s max_active=%d", self.serving.model_id, self.max_active)

    def _engine_max_active(self) -> int:
        try:
            return self._runtime.facts.max_active or DEFAULT_MAX_ACTIVE
        except RuntimeStartError:
            return DEFAULT_MAX_ACTIVE

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._nc.is_closed:
            return
        try:
            await sub.unsubscribe()
        except Exception as exc:
            log.debug("cancel_unsubscribe_failed error=%r", exc)

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(0 if exc[0] is not None else self._settings.shutdown_grace_s)

    def reset_pulls(self) -> None:
        """After a reconnect: the server may have forgotten our pull requests."""
        self._source.reset()

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> None:
        """Stop taking jobs, let those in flight finish for `grace_s`, hand back the rest.

        Order, and why:
        1. stop pulling: no new work is accepted; late deliveries are nak'ed at once so
           another node can take them;
        2. wait up to `grace_s` (or until `abort` is set) for in-flight jobs: their results
           are published and acked as usual, which is the cheapest outcome for the network;
        3. nak what is left, without delay (its requests are aborted): it is redelivered to
           a live node instead of waiting out the ack wait;
        4. close: background tasks stop, the task group ends; the runtime is closed by its
           owner afterwards.
        """
        if not self.is_open:
            await self.aclose()
            return
        self.draining = True
        self._source.stop()
        waits = [asyncio.ensure_future(self._idle.wait())]
        if abort is not None:
            waits.append(asyncio.ensure_future(abort.wait()))
        try:
            await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._waiting.clear()  # nothing starts from here on
        if self._in_flight:
            log.warning("drain_handing_back jobs=%d", len(self._in_flight))
        for record in list(self._in_flight):
            if record.stoppable:
                # its request is aborted; or its failure outcome, not published yet, is not
                self._cut_short(record)
            await self._settle(record, Settle.NAK)
        await self.aclose()

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        self._waiting.clear()
        for record in list(self._in_flight):
            self._cut_short(record)

    @staticmethod
    def _cut_short(record: InFlight) -> None:
        """Abort a job's request and stop the task ending it, whichever it has."""
        if record.answer is not None:
            record.answer.cancel()
        if record.task is not None:
            record.task.cancel()

    async def _recreate_consumer(self) -> None:
        try:
            js = self._nc.jetstream()
            await ensure_consumer(js, self._settings, self.serving.model_id)
        except Exception as exc:
            log.warning("consumer_recreate_failed error=%r", exc)

    # -- intake ----------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        self.metrics.jobs_received += 1
        record, rejection = admit(
            msg,
            model_id=self.serving.model_id,
            max_bytes=self._settings.max_job_bytes,
            now=time.time(),
        )
        self._track(record)
        if rejection is None and record.job is not None:
            if self._take_early_cancel(record.job.job_id):
                rejection = Cancelled(f"job {record.job.job_id} was cancelled before it arrived")
        if rejection is not None or self._tg is None or not self.is_open:
            await self._fail(record, rejection or RuntimeFailure("node stopping"), final=True)
            return
        self._arm_deadline(record)
        if self._waiting or len(self._running) >= self.max_active:
            self._waiting.append(record)
        else:
            self._start(record)

    # -- runtime slots -----------------------------------------------------------------

    def _start(self, record: InFlight) -> None:
        """Give a job a runtime slot and submit its request; `_answered` goes on from there
        (no task per job: the runtime completes the request's future)."""
        job = record.job
        assert job is not None
        self._running.add(record)
        started_at = time.time()
        run_deadline = started_at + self._settings.request_timeout_s + LEASE_GRACE_S
        record.lease_until = min(record.lease_until or run_deadline, run_deadline)
        item = WorkItem(job.job_id, runtime_payload(job), stream=job.stream, deadline=job.deadline)
        try:
            answer = self._runtime.submit(item, self._stream_sink(record) if job.stream else None)
        except Exception as exc:  # the runtime is closing (or a bug): `_answered` ends it
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)
        record.answer = answer
        answer.add_done_callback(functools.partial(self._answered, record, started_at))

    def _free_slot(self, record: InFlight) -> None:
        if record not in self._running:
            return
        self._running.discard(record)
        while self._waiting and len(self._running) < self.max_active and self.is_open:
            queued = self._waiting.popleft()
            if queued in self._in_flight and queued.answer is None and queued.task is None:
                self._start(queued)

    def _answered(
        self, record: InFlight, started_at: float, answer: "asyncio.Future[Completion]"
    ) -> None:
        """The runtime's outcome for a job: a completion goes to the results task; a
        failure, a cancel or a deadline to a task that publishes the job's error. Its slot
        is freed last, once its own outcome is on its way."""
        try:
            self._answered_now(record, started_at, answer)
        finally:
            self._free_slot(record)

    def _answered_now(
        self, record: InFlight, started_at: float, answer: "asyncio.Future[Completion]"
    ) -> None:
        exc = None if answer.cancelled() else answer.exception()  # always retrieved
        if record not in self._in_flight:
            return  # handed back meanwhile (drain)
        if record.stop_reason is not None:
            # Cancelled or past its deadline before its answer was taken: that is its
            # outcome, whatever the runtime answered.
            self._end_stream(record)
            self._spawn(record, self._fail(record, record.stop_reason, final=True))
            return
        if answer.cancelled():
            if not self.draining:  # not drain's hand-back: cut short under it, retry it
                self._end_stream(record)
                failure = RuntimeFailure(f"job {record.job_id}: runtime request cancelled")
                self._spawn(record, self._fail(record, failure, final=False))
            return
        record.stoppable = False
        if exc is not None:
            self._end_stream(record)
            if isinstance(exc, NodeError):
                self._spawn(record, self._fail(record, exc, final=not exc.retryable))
            else:
                log.error("runtime_generate_failed job_id=%s", record.job_id, exc_info=exc)
                failure = RuntimeFailure(f"runtime failed: {exc!r}")
                self._spawn(record, self._fail(record, failure, final=False))
            return
        finished_at = time.time()
        self.metrics.engine_seconds.observe(finished_at - started_at)
        self._answers.append((record, answer.result(), started_at, finished_at))
        self._answers_wake.set()

    def _spawn(self, record: InFlight, outcome: Coroutine[Any, Any, None]) -> None:
        """Run what ends a job in a task of its own (it publishes, and may wait)."""
        if self._tg is None or not self.is_open:
            outcome.close()  # closing: the job is handed back
            return
        record.task = self._tg.create_task(outcome)

    async def _results_loop(self) -> None:
        """Sign and publish the results of the jobs the runtime completed since the last
        round, in order, in one task."""
        while True:
            await self._answers_wake.wait()
            self._answers_wake.clear()
            answers, self._answers = self._answers, []
            for record, done, started_at, finished_at in answers:
                if record not in self._in_flight:
                    continue  # handed back meanwhile (drain)
                try:
                    assert record.job is not None
                    if record.job.stream:
                        await self._finish_stream(record, done)
                    sealed = self._seal(record, done, started_at, finished_at)
                    if sealed is not None:
                        await self._store(record, sealed, 1)
                except Exception:
                    # A bug: the job is handed back rather than lost or left held.
                    log.exception("result_failed job_id=%s", record.job_id)
                    await self._settle(record, Settle.NAK)

    def _track(self, record: InFlight) -> None:
        self._in_flight.add(record)
        if record.job is not None:
            self._by_job[record.job.job_id] = record
        self._idle.clear()
        self.metrics.in_flight = len(self._in_flight)

    # -- cancel and deadline ---------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        if not _JOB_ID.fullmatch(job_id):
            return
        record = self._by_job.get(job_id)
        log.info("job_cancel_received job_id=%s held=%s", job_id, record is not None)
        if record is not None:
            self._stop(record, Cancelled(f"job {job_id} was cancelled"))
            return
        now = time.monotonic()
        self._early_cancels[job_id] = now
        self._early_cancels.move_to_end(job_id)
        while self._early_cancels and (
            len(self._early_cancels) > MAX_EARLY_CANCELS
            or next(iter(self._early_cancels.values())) < now - EARLY_CANCEL_S
        ):
            self._early_cancels.popitem(last=False)

    def _take_early_cancel(self, job_id: str) -> bool:
        at = self._early_cancels.pop(job_id, None)
        return at is not None and at >= time.monotonic() - EARLY_CANCEL_S

    def _stop(self, record: InFlight, reason: NodeError) -> None:
        """Cut a job's run short: its request is aborted, `reason` is its outcome."""
        if not record.stoppable or record.stop_reason is not None:
            return
        record.stop_reason = reason
        if record.answer is not None:
            record.answer.cancel()  # aborts the request; `_answered` ends the job
        elif record.task is None:
            # Waiting for a slot: it leaves the queue and ends here.
            try:
                self._waiting.remove(record)
            except ValueError:
                pass
            self._spawn(record, self._fail(record, reason, final=True))

    # -- one job ---------------------------------------------------------------------

    def _arm_deadline(self, record: InFlight) -> None:
        job = record.job
        if job is not None and job.deadline is not None:
            record.deadline_timer = asyncio.get_running_loop().call_later(
                max(0.0, job.deadline - time.time()),
                self._stop,
                record,
                DeadlineExceeded(f"job {job.job_id} reached its deadline {job.deadline:.3f}"),
            )

    def _stream_sink(self, record: InFlight) -> Callable[[Partial], None]:
        """Where a streaming job's `partial` frames go: coalesced for the stream task."""
        stream = _Stream(record)
        self._streams[record] = stream

        def push(part: Partial) -> None:
            if stream.finished:
                return
            stream.pending_ids.extend(part.token_ids)
            stream.pending_text.append(part.text)
            self._dirty[record] = stream
            self._stream_wake.set()

        return push

    # -- streaming -------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        """Publish what streaming jobs produced since the last message, one message per
        job per round: while a publish waits, new tokens coalesce."""
        while True:
            await self._stream_wake.wait()
            self._stream_wake.clear()
            dirty, self._dirty = self._dirty, {}
            for stream in dirty.values():
                async with stream.lock:
                    if not stream.finished and stream.pending_ids:
                        await self._publish_stream(stream, None)

    async def _publish_stream(self, stream: _Stream, finish_reason: str | None) -> None:
        record = stream.record
        assert record.job is not None
        ids, stream.pending_ids = stream.pending_ids, []
        text = "".join(stream.pending_text)
        stream.pending_text = []
        body: dict[str, Any] = {
            "job_id": record.job.job_id,
            "attempt": record.attempt,
            "seq": stream.seq,
            "token_ids": ids,
            "text": text,
        }
        if finish_reason is not None:
            body["finish_reason"] = finish_reason
        stream.seq += 1
        stream.sent_ids += len(ids)
        stream.sent_text.append(text)
        try:
            await self._publisher.publish_stream(body)
        except Exception as exc:
            log.warning("stream_publish_failed job_id=%s error=%r", record.job.job_id, exc)

    async def _finish_stream(self, record: InFlight, done: Completion) -> None:
        """The last stream message: the tokens not streamed yet, and the finish reason, so
        the streamed tokens concatenate to the result's."""
        stream = self._streams.pop(record, None)
        if stream is None:
            return
        self._dirty.pop(record, None)
        async with stream.lock:
            stream.finished = True
            sent_text = "".join(stream.sent_text)
            stream.pending_ids = done.token_ids[stream.sent_ids :]
            if done.text.startswith(sent_text):
                tail = done.text[len(sent_text) :]
            else:
                # Detokenized pieces can differ from the whole (a multi-byte character cut
                # between steps): token ids still concatenate; the result's text is the truth.
                log.warning("stream_text_diverged job_id=%s", record.job_id)
                tail = ""
            stream.pending_text = [tail]
            await self._publish_stream(stream, done.finish_reason)

    def _end_stream(self, record: InFlight) -> None:
        stream = self._streams.pop(record, None)
        if stream is not None:
            stream.finished = True
        self._dirty.pop(record, None)

    # -- outcomes --------------------------------------------------------------------

    def _seal(
        self, record: InFlight, done: Completion, started_at: float, finished_at: float
    ) -> SealedResult | None:
        """The job's signed result, validated against the schema first; one that fails, or
        that is too large to publish, ends the job with a final OUTPUT_MALFORMED (None)."""
        try:
            return self._publisher.seal_result(
                self._attests(), self._result_fields(record, done, started_at, finished_at)
            )
        except OutputMalformed as exc:
            self._spawn(record, self._fail(record, exc, final=True))  # not in this loop
            return None

    async def _store(self, record: InFlight, result: SealedResult, attempt: int) -> None:
        """Publish a result; the job is settled when the stream answers (`_stored`), so
        the results task goes on instead of waiting for the PubAck."""
        try:
            await self._publisher.store_result(
                result, functools.partial(self._stored, record, result, attempt)
            )
        except Exception as exc:
            self._spawn(record, self._store_failed(record, result, attempt, exc))

    def _stored(
        self, record: InFlight, result: SealedResult, attempt: int, outcome: bool | BaseException
    ) -> None:
        if record not in self._in_flight:
            return
        if isinstance(outcome, BaseException):
            self._spawn(record, self._store_failed(record, result, attempt, outcome))
        else:
            self._acks_due.append(record)
            self._ack_wake.set()

    async def _store_failed(
        self, record: InFlight, result: SealedResult, attempt: int, exc: BaseException
    ) -> None:
        log.warning("result_publish_failed job_id=%s try=%d error=%r", record.job_id, attempt, exc)
        if attempt == PUBLISH_ATTEMPTS or not self.is_open:
            if record.attempt >= self._settings.max_deliver:
                # The last delivery always ends the job.
                failure = RuntimeFailure(f"result not published: {exc!r}")
                await self._fail(record, failure, final=False)
            else:
                await self._settle(record, Settle.NAK)
            return
        await asyncio.sleep(0.2 * attempt)
        await self._store(record, result, attempt + 1)

    async def _ack_loop(self) -> None:
        """Ack the jobs whose results the stream stored, all that landed since the last
        round at once (one task, not one per job)."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            due, self._acks_due = self._acks_due, []
            for record in due:
                if not self._forget(record):
                    continue  # handed back meanwhile (drain)
                self.metrics.jobs_succeeded += 1
                self.metrics.job_latency_seconds.observe(time.monotonic() - record.received)
                self.completed += 1
                try:
                    await record.msg.ack()
                except Exception as exc:
                    log.warning("settle_failed how=ack job_id=%s error=%r", record.job_id, exc)
            self._source.wake()  # once per round: credit grew by the jobs settled

    def _attests(self) -> Attestation:
        """The result's `model` and `runtime` members, validated once per runtime (the
        facts of a new runtime are checked at its first result)."""
        facts = self._runtime.facts
        if self._attestation is None or self._attestation[0] is not facts:
            attestation = Attestation.of(
                {
                    "id": self.serving.model_id,
                    "version": self.serving.model_version,
                    "sha256": self.serving.model_sha256,
                },
                {
                    "image": self.serving.image,
                    "engine": facts.engine,
                    "engine_version": facts.engine_version,
                    "device": facts.device,
                },
            )
            self._attestation = (facts, attestation)
        return self._attestation[1]

    def _result_fields(
        self, record: InFlight, done: Completion, started_at: float, finished_at: float
    ) -> dict[str, Any]:
        """A result's fields but the node's identity and the attestation (the publisher
        fills those in), with no None values."""
        assert record.job is not None
        output: dict[str, Any] = {
            "text": done.text,
            "token_ids": done.token_ids,
            "finish_reason": done.finish_reason,
        }
        if done.logprobs is not None:
            output["logprobs"] = done.logprobs
        usage: dict[str, Any] = {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": len(done.token_ids),
        }
        if done.first_token_s is not None:
            usage["first_token_s"] = done.first_token_s
        return {
            "job_id": record.job.job_id,
            "config_version": self.serving.config_version,
            "input_sha256": record.input_sha256,
            "output": output,
            "usage": usage,
            "attempt": record.attempt,
            "started_at": started_at,
            "finished_at": finished_at,
        }

    async def _fail(self, record: InFlight, error: NodeError, final: bool) -> None:
        if record not in self._in_flight:
            return  # settled or handed back meanwhile: nothing more to report
        code = error_code(error)
        message = str(error)
        if not final and record.attempt >= self._settings.max_deliver:
            final = True
            message = f"{message} (last delivery: {record.attempt} of {self._settings.max_deliver})"
        # Final events are deduplicated per stream message, so a redelivery after a crash
        # between publish and term does not report the same job twice.
        msg_id = (
            f"err-{record.stream_seq}" if final else f"err-{record.stream_seq}-{record.attempt}"
        )
        try:
            await self._publisher.publish_error(
                code,
                message,
                retryable=not final,
                job_id=record.job_id,
                attempt=record.attempt,
                msg_id=msg_id,
            )
        except Exception as exc:
            log.warning("error_publish_failed job_id=%s error=%r", record.job_id, exc)
            # A nak runs the job again and reports it then; but a nak on the last delivery
            # would leave the job in the stream for ever: that one terminates unreported.
            last = record.attempt >= self._settings.max_deliver
            await self._settle(record, Settle.TERM if last else Settle.NAK)
            return
        self.metrics.jobs_failed[code.value] += 1
        if final:
            await self._settle(record, Settle.TERM)
        else:
            await self._settle(record, Settle.NAK, delay=nak_delay(record.attempt))

    async def _settle(self, record: InFlight, how: Settle, delay: float | None = None) -> None:
        if not self._forget(record):
            return
        try:
            if how is Settle.TERM:
                await record.msg.term()
            else:
                await record.msg.nak(delay=delay)
        except Exception as exc:
            log.warning("settle_failed how=%s job_id=%s error=%r", how.value, record.job_id, exc)
        self._source.wake()

    def _forget(self, record: InFlight) -> bool:
        """Take a job out of flight as it is settled; False when it was not in flight (it
        was settled or handed back already)."""
        if record not in self._in_flight:
            return False
        self._in_flight.discard(record)
        if record.job is not None and self._by_job.get(record.job.job_id) is record:
            del self._by_job[record.job.job_id]
        if record.deadline_timer is not None:
            record.deadline_timer.cancel()
        self.metrics.in_flight = len(self._in_flight)
        if not self._in_flight:
            self._idle.set()
        return True

    # -- ack-wait keepalive ----------------------------------------------------------

    async def _progress_loop(self) -> None:
        """Tell the server a job is still being worked on before its ack wait runs out,
        up to its run deadline: past that the server may give it to another node."""
        interval = self._settings.ack_wait_s / 4
        while True:
            await asyncio.sleep(interval)
            due = time.monotonic() - self._settings.ack_wait_s / 2
            now = time.time()
            for record in list(self._in_flight):
                if record.progress_at < due and extends_lease(record, now):
                    record.progress_at = time.monotonic()
                    try:
                        await record.msg.in_progress()
                    except Exception as exc:
                        log.debug("in_progress_failed job_id=%s error=%r", record.job_id, exc)
