"""The job pipeline for one served model: intake -> batcher -> runtime -> signed outcome.

Every delivered job ends in exactly one of three ways, and only after what the network must
see is stored in JetStream:

    result        sign, publish with `Nats-Msg-Id: <job_id>`, wait for the stream's ack, ack
    retryable     publish a retryable error event, nak with a growing delay (last delivery:
                  publish a final error event and term instead)
    final error   publish a signed error event, term

If a publish fails the job is nak'ed, never acked: it runs again and the stream's duplicate
window turns the repeated result into a no-op.
"""

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.result import ResultBody
from worker.core.errors import (
    DeadlineExceeded,
    NodeError,
    OutputMalformed,
    RuntimeFailure,
    error_code,
)
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.jobs.intake import InFlight, JobSource, admit
from worker.jobs.provision import consumer_name, ensure_consumer
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, Runtime, WorkItem

log = logging.getLogger(__name__)

NAK_BASE_DELAY_S = 1.0
NAK_MAX_DELAY_S = 60.0
PUBLISH_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Serving:
    """What the results of this pipeline attest: the model, the image, the snapshot."""

    model_id: str
    model_version: str
    model_sha256: str
    image: str
    config_version: int


class PipelineState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


def nak_delay(attempt: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_BASE_DELAY_S * 2.0 ** (attempt - 1))


class Pipeline:
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
        self._nc = nc
        self._settings = settings
        self._publisher = publisher
        self._runtime = runtime
        self.serving = serving
        self.metrics = metrics or Metrics()
        self._queue: asyncio.Queue[InFlight] = asyncio.Queue()
        self._in_flight: set[InFlight] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self.state = PipelineState.NEW
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

    async def __aenter__(self) -> "Pipeline":
        if self.state is not PipelineState.NEW:
            raise RuntimeError(f"pipeline is {self.state.value}; a pipeline runs once")
        self.state = PipelineState.RUNNING
        self._runner = asyncio.create_task(self._run(), name="pipeline")
        self._runner.add_done_callback(self._runner_done)
        return self

    def _runner_done(self, task: "asyncio.Task[None]") -> None:
        if task.cancelled() or self.state is not PipelineState.RUNNING:
            return
        # Only a bug gets here: every job outcome and I/O error is handled inside the tasks.
        log.error("pipeline_stopped_unexpectedly error=%r", task.exception())
        self.state = PipelineState.CLOSED

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(0 if exc[0] is not None else self._settings.shutdown_grace_s)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            tg.create_task(self._source.run(), name="intake")
            tg.create_task(self._batch_loop(), name="batcher")
            tg.create_task(self._progress_loop(), name="progress")

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
        3. nak what is left, without delay: it is redelivered to a live node instead of
           waiting out the ack wait;
        4. cancel the background tasks; the runtime is closed by its owner afterwards.
        """
        if self.state in (PipelineState.CLOSED, PipelineState.NEW):
            self.state = PipelineState.CLOSED
            return
        self.state = PipelineState.DRAINING
        self._source.stop()
        waits = [asyncio.ensure_future(self._idle.wait())]
        if abort is not None:
            waits.append(asyncio.ensure_future(abort.wait()))
        try:
            await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._in_flight:
            log.warning("drain_handing_back jobs=%d", len(self._in_flight))
        for record in list(self._in_flight):
            await self._settle(record, "nak")
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.error("pipeline_task_failed error=%r", exc)
        self.state = PipelineState.CLOSED

    async def _recreate_consumer(self) -> None:
        try:
            js = self._nc.jetstream()
            await ensure_consumer(js, self._settings, self.serving.model_id)
        except Exception as exc:
            log.warning("consumer_recreate_failed error=%r", exc)

    # intake

    async def _on_message(self, msg: Msg) -> None:
        self.metrics.jobs_received += 1
        record, rejection = admit(
            msg,
            model_id=self.serving.model_id,
            max_bytes=self._settings.max_job_bytes,
            now=time.time(),
        )
        self._track(record)
        if rejection is not None:
            await self._fail(record, rejection, final=True)
        else:
            self._queue.put_nowait(record)

    def _track(self, record: InFlight) -> None:
        self._in_flight.add(record)
        self._idle.clear()
        self.metrics.in_flight = len(self._in_flight)

    # batching

    async def _batch_loop(self) -> None:
        """Run what is queued as one batch, at once: while the runtime works on a batch the
        next one forms by itself, so low load gets no added wait and high load gets full
        batches. `batch_max_wait_ms` can add a linger for a fuller batch."""
        max_size = self._settings.batch_max_size
        linger = self._settings.batch_max_wait_ms / 1000
        while True:
            batch = [await self._queue.get()]
            until = time.monotonic() + linger
            while len(batch) < max_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[InFlight]) -> None:
        now = time.time()
        runnable: list[InFlight] = []
        for record in batch:
            assert record.job is not None
            if record.job.deadline is not None and record.job.deadline < now:
                self._spawn(self._fail(record, DeadlineExceeded("deadline passed in queue"), True))
            else:
                runnable.append(record)
        if not runnable:
            return
        items = [WorkItem(r.job.job_id, _payload(r)) for r in runnable if r.job is not None]
        started_wall, started = time.time(), time.monotonic()
        try:
            outcomes = await self._runtime.run(items)
        except Exception as exc:
            log.exception("runtime_run_failed batch=%d", len(items))
            outcomes = [RuntimeFailure(f"runtime failed: {exc!r}") for _ in items]
        self.metrics.batch_size.observe(len(items))
        self.metrics.engine_seconds.observe(time.monotonic() - started)
        finished_wall = time.time()
        for record, outcome in zip(runnable, outcomes, strict=True):
            if isinstance(outcome, Completion):
                self._spawn(self._succeed(record, outcome, started_wall, finished_wall))
            else:
                self._spawn(self._fail(record, outcome, final=not outcome.retryable))

    def _spawn(self, coro: Any) -> None:
        assert self._tasks is not None
        self._tasks.create_task(coro)

    # outcomes

    async def _succeed(
        self, record: InFlight, done: Completion, started_at: float, finished_at: float
    ) -> None:
        try:
            # Validated against the schema before signing; one that fails, or that is too
            # large to publish, ends the job with a final OUTPUT_MALFORMED.
            body = self._result_body(record, done, started_at, finished_at)
        except OutputMalformed as exc:
            await self._fail(record, exc, final=True)
            return
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                await self._publisher.publish_result(body)
                break
            except OutputMalformed as exc:
                await self._fail(record, exc, final=True)
                return
            except Exception as exc:
                log.warning(
                    "result_publish_failed job_id=%s try=%d error=%r",
                    record.job_id,
                    attempt,
                    exc,
                )
                if attempt == PUBLISH_ATTEMPTS or self.state is PipelineState.CLOSED:
                    if record.attempt >= self._settings.max_deliver:
                        # The last delivery always ends the job.
                        failure = RuntimeFailure(f"result not published: {exc!r}")
                        await self._fail(record, failure, final=False)
                    else:
                        await self._settle(record, "nak")
                    return
                await asyncio.sleep(0.2 * attempt)
        self.metrics.jobs_succeeded += 1
        self.metrics.job_latency_seconds.observe(time.monotonic() - record.received)
        self.completed += 1
        await self._settle(record, "ack")

    def _result_body(
        self, record: InFlight, done: Completion, started_at: float, finished_at: float
    ) -> ResultBody:
        facts = self._runtime.facts
        assert record.job is not None
        fields = {
            "job_id": record.job.job_id,
            "model": {
                "id": self.serving.model_id,
                "version": self.serving.model_version,
                "sha256": self.serving.model_sha256,
            },
            "runtime": {
                "image": self.serving.image,
                "engine": facts.engine,
                "engine_version": facts.engine_version,
                "device": facts.device,
            },
            "config_version": self.serving.config_version,
            "input_sha256": record.input_sha256,
            "output": {
                "text": done.text,
                "token_ids": done.token_ids,
                "finish_reason": done.finish_reason,
            },
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": len(done.token_ids),
            },
            "attempt": record.attempt,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        return self._publisher.result_body(fields)

    async def _fail(self, record: InFlight, error: NodeError, final: bool) -> None:
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
            await self._settle(record, "term" if last else "nak")
            return
        self.metrics.jobs_failed[code.value] += 1
        if final:
            await self._settle(record, "term")
        else:
            await self._settle(record, "nak", delay=nak_delay(record.attempt))

    async def _settle(self, record: InFlight, how: str, delay: float | None = None) -> None:
        if record not in self._in_flight:
            return
        self._in_flight.discard(record)
        self.metrics.in_flight = len(self._in_flight)
        if not self._in_flight:
            self._idle.set()
        try:
            if how == "ack":
                await record.msg.ack()
            elif how == "term":
                await record.msg.term()
            else:
                await record.msg.nak(delay=delay)
        except Exception as exc:
            log.warning("settle_failed how=%s job_id=%s error=%r", how, record.job_id, exc)
        self._source.wake()

    # ack-wait keepalive

    async def _progress_loop(self) -> None:
        """Tell the server a job is still being worked on before its ack wait runs out."""
        interval = self._settings.ack_wait_s / 4
        while True:
            await asyncio.sleep(interval)
            due = time.monotonic() - self._settings.ack_wait_s / 2
            for record in list(self._in_flight):
                if record.progress_at < due:
                    record.progress_at = time.monotonic()
                    try:
                        await record.msg.in_progress()
                    except Exception as exc:
                        log.debug("in_progress_failed job_id=%s error=%r", record.job_id, exc)


def _payload(record: InFlight) -> dict[str, Any]:
    job = record.job
    assert job is not None
    payload: dict[str, Any] = {"params": job.params.model_dump(exclude_none=True)}
    if job.prompt is not None:
        payload["prompt"] = job.prompt
    elif job.messages is not None:
        payload["messages"] = [m.model_dump() for m in job.messages]
    else:
        payload["prompt_token_ids"] = job.prompt_token_ids
    return payload
