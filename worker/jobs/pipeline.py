"""The job pipeline: intake -> runtime, one request per job -> signed outcome, each job
settled as soon as it completes; it pulls from one model's consumer at a time.

Every delivered job ends in exactly one of three ways, and only after what the network must
see is stored in JetStream:

    result        sign, publish with `Nats-Msg-Id: <job_id>`, wait for the stream's ack, ack
    retryable     publish a retryable error event, nak with a growing delay (last delivery:
                  publish a final error event and term instead)
    final error   publish a signed error event, term (bad input, cancelled, deadline passed)

If a publish fails the job is nak'ed, never acked: it runs again and the stream's duplicate
window turns the repeated result into a no-op. A job handed back (a drain, a model switch)
is nak'ed with no error event: it was not at fault.

Each job is one record (`InFlight`) in one phase (`states.Phase`); `states.transition`
decides every move, and this module carries the decisions out. The runtime is kept
supplied with up to `runtime_max_active` requests (0: what the engine reports it runs
concurrently; the others wait in a queue); results come back in completion order. No task
runs per job on the way to a result: a job's request is submitted from the intake callback
(or when a slot frees), the runtime completes its future, the one results task signs and
publishes, the stream's PubAck lands in a callback, and the one settle task acks. A job
that fails gets a task of its own to publish its error event. While a job runs:
- `stream: true` jobs publish signed `stream` envelopes on `rst.stream.<job_id>`, coalesced
  by one publisher task, so the frame reader never waits on NATS;
- a cancel on `rst.cancel.<job_id>` (also one that arrived up to `EARLY_CANCEL_S` before
  the job) aborts the request, publishes `CANCELLED` and terms the job;
- its `deadline` aborts the request (`DEADLINE_EXCEEDED`);
- in-progress acks keep its lease, but never past its run deadline.
"""

import asyncio
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
from worker.core.tally import Tally
from worker.jobs.intake import InFlight, JobSource, admit
from worker.jobs.provision import consumer_name, ensure_consumer
from worker.jobs.publisher import Attestation, Publisher, SealedResult
from worker.jobs.states import (
    ABORTED,
    ANSWER,
    HAND_BACK,
    REPORT_FAILED,
    START,
    STORED,
    Do,
    Event,
    Failed,
    Malformed,
    Phase,
    Reported,
    Step,
    Stop,
    StoreFailed,
    transition,
)
from worker.runtime.api import Completion, Partial, Runtime, RuntimeFacts, WorkItem

log = logging.getLogger(__name__)

EARLY_CANCEL_S = 60.0
MAX_EARLY_CANCELS = 10_000
DEFAULT_MAX_ACTIVE = 64
LEASE_GRACE_S = 5.0
SETTLE_FLUSH_S = 10.0
CANCEL_SUMMARY_S = 10.0
_JOB_ID = re.compile(JOB_ID_PATTERN)
_NOTHING, _SUBMIT, _ABORT, _PUBLISH, _REPUBLISH, _REPORT, _ACK, _NAK, _TERM = Do
_ADMITTED, _ANSWERED, _ACKED, _NAKED = Phase.ADMITTED, Phase.ANSWERED, Phase.ACKED, Phase.NAKED


@dataclass(frozen=True, slots=True)
class Serving:
    """What the results of this pipeline attest: the model, the image, the snapshot."""

    model_id: str
    model_version: str
    model_sha256: str
    image: str
    config_version: int


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
    """Consumes one model's jobs at a time. `async with` starts it pulling from `serving`'s
    consumer; `drain()` stops pulling and empties it, `resume()` pulls again (from another
    model's consumer, say), `aclose()` ends it."""

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
        self._held: set[InFlight] = set()
        """Every job not settled yet, whatever its phase."""
        self._by_job: dict[str, InFlight] = {}
        """`_held` by job id, for cancels."""
        self._early_cancels: OrderedDict[str, float] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tg: asyncio.TaskGroup | None = None
        self.max_active = DEFAULT_MAX_ACTIVE
        self._active = 0
        """Requests with the runtime (their futures not called back yet): the slots taken."""
        self._waiting: deque[InFlight] = deque()
        """Jobs admitted while every slot was taken, oldest first; one that left the
        ADMITTED phase meanwhile (cancelled, handed back) is skipped."""
        self._dirty: dict[InFlight, _Stream] = {}
        self._streams: dict[InFlight, _Stream] = {}
        self._stream_wake = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._intake: asyncio.Task[None] | None = None
        self._attestation: tuple[RuntimeFacts, Attestation] | None = None
        self._answers: list[tuple[InFlight, float, float]] = []
        """ANSWERED jobs for the results task, with when their request started and ended."""
        self._answers_wake = asyncio.Event()
        self._settles: list[tuple[InFlight, float | None]] = []
        """Settled jobs whose ack, nak (with its delay) or term the settle task sends."""
        self._settle_wake = asyncio.Event()
        self._settler: asyncio.Task[None] | None = None
        self._settles_sent = asyncio.Event()
        self._settles_sent.set()
        self.completed = 0
        self._unheld_cancels = Tally(
            log, "job_cancel_unheld job_id=%s", "job_cancels_unheld", period_s=CANCEL_SUMMARY_S
        )
        self._source = self._source_for(serving.model_id)

    @property
    def in_flight(self) -> int:
        return len(self._held)

    @property
    def cancels_unheld(self) -> int:
        """Cancels received for jobs this pipeline did not hold (remembered for a while)."""
        return self._unheld_cancels.total

    @property
    def pulling(self) -> bool:
        return self._intake is not None and not self._intake.done()

    async def asked(self) -> None:
        """Returns once this pipeline's first pull request on its consumer reached the
        server (so consumer info shows the model as pulled: a request waiting, or jobs
        delivered)."""
        await self._source.asked.wait()
        await self._nc.flush()

    def _credit(self) -> int:
        return self._settings.max_in_flight - len(self._held)

    def _source_for(self, model_id: str) -> JobSource:
        return JobSource(
            self._nc,
            stream=self._settings.stream("JOBS"),
            consumer=consumer_name(self._settings, model_id),
            credit=self._credit,
            on_message=self._on_message,
            on_consumer_lost=self._recreate_consumer,
        )

    async def _open(self, stack: AsyncExitStack) -> None:
        self.max_active = self._settings.runtime_max_active or self._engine_max_active()
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        cancel_sub: Subscription = await self._nc.subscribe(
            self._settings.subject("cancel", "*"), cb=self._on_cancel
        )
        stack.push_async_callback(self._unsubscribe, cancel_sub)
        for coro, name in (
            (self._progress_loop(), "progress"),
            (self._stream_loop(), "stream"),
            (self._results_loop(), "results"),
        ):
            self._background.append(self._tg.create_task(coro, name=name))
        self._settler = self._tg.create_task(self._settle_loop(), name="settle")
        self._background.append(self._settler)
        self._intake = self._tg.create_task(self._source.run(), name="intake")
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
        if self.is_open:
            await self.drain(0 if exc[0] is not None else self._settings.shutdown_grace_s)
        await self.aclose()

    def reset_pulls(self) -> None:
        """After a reconnect: the server may have forgotten our pull requests."""
        self._source.reset()

    # -- stop, hand back, resume ---------------------------------------------------------

    async def pause(self) -> None:
        """Stop pulling: returns once no pull request of this pipeline is left open (a late
        delivery is nak'ed at once, so another node can take it). Jobs in flight go on."""
        self._source.stop()
        if self._intake is not None:
            await asyncio.wait([self._intake])

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> int:
        """Stop pulling, let the jobs in flight finish for up to `grace_s`, hand back the
        rest; returns how many were handed back. The pipeline stays open and paused:
        `resume` pulls again, `aclose` ends it. `grace_s` 0 hands back everything now (a
        revoked model).

        Order, and why:
        1. stop pulling: no new work is accepted, so the wait below can end;
        2. wait up to `grace_s` (or until `abort` is set) for in-flight jobs: their results
           are published and acked as usual, which is the cheapest outcome for the network;
        3. nak what is left, without delay and without an error event (its requests are
           aborted): it is redelivered to a live node instead of waiting out the ack wait;
        4. wait until the settle task has sent every ack and nak decided so far.
        """
        await self.pause()
        if self._held and grace_s > 0:
            waits = [asyncio.ensure_future(self._idle.wait())]
            if abort is not None:
                waits.append(asyncio.ensure_future(abort.wait()))
            try:
                await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        handed_back = self._hand_back_all()
        await self._flush_settles()
        return handed_back

    async def resume(self, serving: Serving) -> None:
        """Pull again, from `serving`'s consumer (created if missing: a NATS error if it
        cannot be, and the pipeline stays paused); its results attest `serving`. Only once
        drained: a job in flight must not attest a model it did not run on."""
        self.check_open()
        if self.pulling or self._held:
            raise RuntimeError("resume() needs a drained pipeline")
        await ensure_consumer(self._nc.jetstream(), self._settings, serving.model_id)
        assert self._tg is not None
        self.serving = serving
        self._attestation = None
        self._source = self._source_for(serving.model_id)
        self._intake = self._tg.create_task(self._source.run(), name="intake")
        log.info("pipeline_resumed model=%s", serving.model_id)

    def _hand_back_all(self) -> int:
        held = list(self._held)
        if held:
            log.warning("drain_handing_back jobs=%d", len(held))
        for record in held:
            self._apply(record, HAND_BACK)
        return len(held)

    async def _flush_settles(self) -> None:
        """Wait until the settle task has sent what was decided; once it has ended (a task
        group that failed has cancelled it), send it here."""
        settler = self._settler
        if self._settles_sent.is_set() or settler is None:
            return
        if settler.done():
            while self._settles:
                await self._send_settles()
            return
        sent = asyncio.ensure_future(self._settles_sent.wait())
        try:
            await asyncio.wait(
                [sent, settler], timeout=SETTLE_FLUSH_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            sent.cancel()
        if self._settles:
            log.warning("settle_flush_incomplete pending=%d", len(self._settles))

    async def _close(self) -> None:
        """Closing without a drain (a crash, a cancel): pull no more, hand back what is
        held, send the naks, then stop the background tasks."""
        self._source.stop()
        if self._tg is not None:
            self._hand_back_all()
            await self._flush_settles()
        for task in self._background:
            task.cancel()
        self._unheld_cancels.close()

    async def _recreate_consumer(self) -> None:
        try:
            js = self._nc.jetstream()
            await ensure_consumer(js, self._settings, self.serving.model_id)
        except Exception as exc:
            log.warning("consumer_recreate_failed error=%r", exc)

    # -- one job's moves -----------------------------------------------------------------

    def _apply(self, record: InFlight, event: Event) -> Step:
        """Move `record` on `event` and carry out the decision; PUBLISH and REPUBLISH are
        left to the caller, which holds what they need (the answer, the signed result)."""
        step = transition(record, event, self._settings.max_deliver)
        do = step.do
        if do is _NOTHING:
            return step
        record.phase = step.phase
        if do is _SUBMIT:
            self._submit(record)
        elif do is _ACK or do is _NAK or do is _TERM:
            self._settle(record, step.delay)
        elif do is _ABORT:
            record.reason = step.error
            if record.answer is not None:
                record.answer.cancel()  # the runtime's answer comes back to `_answered`
        elif do is _REPORT:
            record.reason = step.error
            self._end_stream(record)
            self._spawn(record, self._report(record, step))
        return step

    def _start(self, record: InFlight) -> None:
        self._apply(record, START)

    def _stop(self, record: InFlight, reason: NodeError) -> None:
        """Cut a job's run short (cancel, deadline): `reason` is its outcome, if it still
        runs (a cancel once its answer is in changes nothing)."""
        self._apply(record, Stop(reason))

    def _spawn(self, record: InFlight, outcome: Coroutine[Any, Any, None]) -> None:
        """Run what ends a job in a task of its own (it publishes, and may wait)."""
        if self._tg is None or not self.is_open:
            outcome.close()  # closing: the job goes back to the stream
            self._apply(record, HAND_BACK)
            return
        record.task = self._tg.create_task(outcome)

    def _settle(self, record: InFlight, delay: float | None) -> None:
        """The job leaves the pipeline; the settle task sends its ack, nak or term."""
        self._held.discard(record)
        if record.job is not None and self._by_job.get(record.job.job_id) is record:
            del self._by_job[record.job.job_id]
        if record.deadline_timer is not None:
            record.deadline_timer.cancel()
        if record.answer is not None and not record.answer.done():
            record.answer.cancel()  # handed back while running: its request is aborted
        if record.task is not None and record.task is not asyncio.current_task():
            record.task.cancel()
        if self._streams:
            self._end_stream(record)
        self.metrics.in_flight = len(self._held)
        if not self._held:
            self._idle.set()
        self._settles.append((record, delay))
        self._settles_sent.clear()
        self._settle_wake.set()

    # -- intake ----------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        self.metrics.jobs_received += 1
        record, rejection = admit(
            msg,
            model_id=self.serving.model_id,
            max_bytes=self._settings.max_job_bytes,
            now=time.time(),
        )
        self._held.add(record)
        if record.job is not None:
            self._by_job[record.job.job_id] = record
        self._idle.clear()
        self.metrics.in_flight = len(self._held)
        if rejection is None and record.job is not None:
            if self._take_early_cancel(record.job.job_id):
                rejection = Cancelled(f"job {record.job.job_id} was cancelled before it arrived")
        if rejection is not None:
            self._stop(record, rejection)
            return
        self._arm_deadline(record)
        if self._waiting or self._active >= self.max_active:
            self._waiting.append(record)
        else:
            self._start(record)

    # -- runtime slots -----------------------------------------------------------------

    def _submit(self, record: InFlight) -> None:
        """Send a job's request; `_answered` goes on from there (no task per job: the
        runtime completes the request's future)."""
        job = record.job
        assert job is not None
        self._active += 1
        started_at = time.time()
        self.metrics.observe_queue_wait(self.serving.model_id, started_at - published_at(record))
        run_deadline = started_at + self._settings.request_timeout_s + LEASE_GRACE_S
        record.lease_until = min(record.lease_until or run_deadline, run_deadline)
        item = WorkItem(job.job_id, job.request_item(), stream=job.stream, deadline=job.deadline)
        try:
            answer = self._runtime.submit(item, self._stream_sink(record) if job.stream else None)
        except Exception as exc:  # the runtime is closing (or a bug): `_answered` ends it
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)
        record.answer = answer
        answer.add_done_callback(functools.partial(self._answered, record, started_at))

    def _answered(
        self, record: InFlight, started_at: float, answer: "asyncio.Future[Completion]"
    ) -> None:
        """The runtime's outcome for a job: a completion goes to the results task, a
        failure to the job's error report. Its slot is freed last, once its own outcome is
        on its way."""
        self._active -= 1
        try:
            event: Event
            if answer.cancelled():
                event = ABORTED
            elif (exc := answer.exception()) is None:
                event = ANSWER
            elif isinstance(exc, NodeError):
                event = Failed(exc)
            else:
                log.error("runtime_generate_failed job_id=%s", record.job_id, exc_info=exc)
                event = Failed(RuntimeFailure(f"runtime failed: {exc!r}"))
            if self._apply(record, event).do is _PUBLISH:
                finished_at = time.time()
                self.metrics.engine_seconds.observe(finished_at - started_at)
                done = answer.result()
                self.metrics.observe_completion(
                    self.serving.model_id,
                    prompt_tokens=done.prompt_tokens,
                    generated_tokens=len(done.token_ids),
                    first_token_s=done.first_token_s,
                    engine_s=finished_at - started_at,
                )
                self._answers.append((record, started_at, finished_at))
                self._answers_wake.set()
        finally:
            self._free_slot()

    def _free_slot(self) -> None:
        waiting = self._waiting
        while waiting and self._active < self.max_active and self.is_open:
            queued = waiting.popleft()
            if queued.phase is _ADMITTED:
                self._start(queued)

    # -- cancel and deadline ---------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        if not _JOB_ID.fullmatch(job_id):
            return
        record = self._by_job.get(job_id)
        if record is not None:
            log.info("job_cancel_received job_id=%s", job_id)
            self._stop(record, Cancelled(f"job {job_id} was cancelled"))
            return
        # Remembered in case the job comes later; a flood of them (any client may cancel
        # any id) is counted, not logged line by line.
        self._unheld_cancels.add(job_id)
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

    async def _results_loop(self) -> None:
        """Sign and publish the results of the jobs the runtime completed since the last
        round, in order, in one task."""
        while True:
            await self._answers_wake.wait()
            self._answers_wake.clear()
            answers, self._answers = self._answers, []
            for record, started_at, finished_at in answers:
                if record.phase is not _ANSWERED or record.answer is None:
                    continue  # handed back meanwhile (drain)
                try:
                    done = record.answer.result()
                    assert record.job is not None
                    if record.job.stream:
                        await self._finish_stream(record, done)
                        if record.phase is not _ANSWERED:
                            continue
                    sealed = self._seal(record, done, started_at, finished_at)
                    if sealed is not None:
                        await self._store(record, sealed, 1)
                except Exception:
                    # A bug: the job is handed back rather than lost or left held.
                    log.exception("result_failed job_id=%s", record.job_id)
                    self._apply(record, HAND_BACK)

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
            self._apply(record, Malformed(exc))
            return None

    async def _store(self, record: InFlight, result: SealedResult, tries: int) -> None:
        """Publish a result; the job moves on when the stream answers (`_stored`), so the
        results task goes on instead of waiting for the PubAck."""
        try:
            await self._publisher.store_result(
                result, functools.partial(self._stored, record, result, tries)
            )
        except Exception as exc:
            self._store_failed(record, result, tries, exc)

    def _stored(
        self, record: InFlight, result: SealedResult, tries: int, outcome: bool | BaseException
    ) -> None:
        if isinstance(outcome, BaseException):
            self._store_failed(record, result, tries, outcome)
        else:
            self._apply(record, STORED)

    def _store_failed(
        self, record: InFlight, result: SealedResult, tries: int, exc: BaseException
    ) -> None:
        if record.phase is not _ANSWERED:
            return
        log.warning("result_publish_failed job_id=%s try=%d error=%r", record.job_id, tries, exc)
        step = self._apply(record, StoreFailed(exc, tries))
        if step.do is _REPUBLISH:
            self._spawn(record, self._republish(record, result, tries + 1, step.delay or 0.0))

    async def _republish(
        self, record: InFlight, result: SealedResult, tries: int, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        await self._store(record, result, tries)

    async def _report(self, record: InFlight, step: Step) -> None:
        """Publish a job's error event as `step` says, then feed back how that went."""
        error = step.error
        assert error is not None
        code = error_code(error)
        message = str(error)
        max_deliver = self._settings.max_deliver
        if step.last_delivery:
            message = f"{message} (last delivery: {record.attempt} of {max_deliver})"
        # Final events are deduplicated per stream message, so a redelivery after a crash
        # between publish and term does not report the same job twice.
        msg_id = (
            f"err-{record.stream_seq}"
            if step.final
            else f"err-{record.stream_seq}-{record.attempt}"
        )
        try:
            await self._publisher.publish_error(
                code,
                message,
                retryable=not step.final,
                job_id=record.job_id,
                attempt=record.attempt,
                msg_id=msg_id,
            )
        except Exception as exc:
            log.warning("error_publish_failed job_id=%s error=%r", record.job_id, exc)
            self._apply(record, REPORT_FAILED)
            return
        self.metrics.jobs_failed[code.value] += 1
        self._apply(record, Reported(step.final))

    async def _settle_loop(self) -> None:
        """Send the acks, naks and terms decided since the last round, all at once (one
        task, not one per job)."""
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            await self._send_settles()

    async def _send_settles(self) -> None:
        """One round: what was decided since the last one."""
        due, self._settles = self._settles, []
        for record, delay in due:
            how = record.phase
            try:
                if how is _ACKED:
                    self.metrics.jobs_succeeded += 1
                    self.metrics.job_latency_seconds.observe(time.monotonic() - record.received)
                    self.completed += 1
                    await record.msg.ack()
                elif how is _NAKED:
                    await record.msg.nak(delay=delay)
                else:
                    await record.msg.term()
            except Exception as exc:
                log.warning(
                    "settle_failed how=%s job_id=%s error=%r", how.value, record.job_id, exc
                )
        self._source.wake()  # once per round: credit grew by the jobs settled
        if not self._settles:
            self._settles_sent.set()

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
                    **_devices(facts),
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

    # -- ack-wait keepalive ----------------------------------------------------------

    async def _progress_loop(self) -> None:
        """Tell the server a job is still being worked on before its ack wait runs out,
        up to its run deadline: past that the server may give it to another node."""
        interval = self._settings.ack_wait_s / 4
        while True:
            await asyncio.sleep(interval)
            due = time.monotonic() - self._settings.ack_wait_s / 2
            now = time.time()
            for record in list(self._held):
                if record.progress_at < due and extends_lease(record, now):
                    record.progress_at = time.monotonic()
                    try:
                        await record.msg.in_progress()
                    except Exception as exc:
                        log.debug("in_progress_failed job_id=%s error=%r", record.job_id, exc)


def published_at(record: InFlight) -> float:
    """When the job was stored in its stream (JetStream's message timestamp)."""
    try:
        return record.msg.metadata.timestamp.timestamp()
    except Exception:  # not a JetStream message (a test's plain one): no wait to tell
        return time.time()


def _devices(facts: RuntimeFacts) -> dict[str, Any]:
    """A result's `runtime.devices` (every accelerator, absent on CPU) and
    `runtime.execution_class` (absent when the runtime's launch did not say) (PROTOCOL.md)."""
    named: dict[str, Any] = {}
    if facts.devices:
        named["devices"] = [
            {"name": d.name, "uuid": d.uuid, "memory_bytes": d.memory_bytes} for d in facts.devices
        ]
    if facts.execution_class:
        named["execution_class"] = facts.execution_class
    return named
