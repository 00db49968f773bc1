"""The job pipeline against a real nats-server: exactly one outcome per job, nothing lost;
jobs run concurrently and settle as they complete; streaming, cancel and live deadlines."""

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.event import ErrorCode
from schemas.stream import StreamBody
from tests.support.jobnet import EchoRuntime, errors, job, publish_job, queue_empty, results
from tests.support.pipeline import SERVING, settings_for
from tests.support.polling import wait_for
from worker.client import JobFailed, cancel, submit
from worker.core.errors import Cancelled, RuntimeEnded
from worker.core.resource import finish_uncancellable
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify
from worker.jobs import pipeline as pipeline_module
from worker.jobs.intake import InFlight
from worker.jobs.pipeline import Pipeline, extends_lease
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, PartialSink, WorkItem

pytestmark = pytest.mark.nats


class Net:
    """One provisioned network and a node key."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings
        self.key = NodeKey.generate()

    def pipeline(self, runtime: Any) -> Pipeline:
        publisher = Publisher(self.nc, self.js, self.key, self.settings)
        return Pipeline(self.nc, self.settings, publisher, runtime, SERVING)

    async def publish(self, job_id: str, **extra: Any) -> None:
        await publish_job(self.js, self.settings, "demo", job(job_id, **extra), job_id)

    async def cancel(self, job_id: str) -> None:
        subject = self.settings.subject("cancel", job_id)
        await self.nc.publish(subject, msgpack.packb({"job_id": job_id}))
        await self.nc.flush()

    async def final_error(self, code: ErrorCode) -> None:
        async def seen() -> bool:
            errs = await errors(self.js, self.settings)
            return any(e.code == code and not e.retryable for e in errs)

        await wait_for(seen, timeout=20)


async def provisioned(nc: Client, tmp_path: Path, **kw: object) -> Net:
    settings = settings_for(tmp_path, **kw)
    await provision(nc.jetstream(), settings, ["demo"])
    return Net(nc, settings)


class BlockingRuntime(EchoRuntime):
    """Every request waits until released (or cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(item.job_id)
            raise
        return self.answer(item)


async def test_mixed_jobs_get_exactly_one_outcome_each(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    runtime = EchoRuntime(delay_s=0.01)
    valid, invalid = [], {}
    for i in range(1000):
        kind = i % 10
        jid = f"job-{i}"
        if kind == 3:
            data, code = b"\xc1garbage", ErrorCode.BAD_REQUEST
        elif kind == 5:
            data, code = job(jid, prompt="x" * 20_000), ErrorCode.BAD_REQUEST
        elif kind == 7:
            data, code = job(jid, model="other"), ErrorCode.UNKNOWN_MODEL
        elif kind == 9:
            data, code = job(jid, deadline=time.time() - 1), ErrorCode.DEADLINE_EXCEEDED
        else:
            data, code = job(jid), None
        if code is None:
            valid.append(jid)
        else:
            invalid[jid] = code
        await publish_job(net.js, net.settings, "demo", data, jid)

    async with net.pipeline(runtime) as pipe:

        async def done() -> bool:
            return pipe.completed == len(valid) and await queue_empty(nc, net.settings)

        await wait_for(done)
        got = await results(net.js, net.settings)
        errs = await errors(net.js, net.settings)

    assert sorted(r.job_id for r in got) == sorted(valid)
    assert all(r.node_id == net.key.node_id and r.config_version == 7 for r in got)
    assert all(r.model.sha256 == "a" * 64 and r.runtime.engine == "echo" for r in got)
    assert all(r.usage.first_token_s == 0.001 for r in got)
    assert len(errs) == len(invalid)
    assert all(not e.retryable for e in errs)
    # even undecodable jobs are named, by their Nats-Msg-Id
    assert {e.job_id: e.code for e in errs} == invalid
    # the runtime was kept supplied up to what it reported it runs at once
    assert runtime.peak == runtime.facts.max_active == pipe.max_active


class FlakyRuntime(EchoRuntime):
    """Fails every request with a retryable error the first `failures` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeEnded("runtime exited with code 137")
        return await super().generate(item, on_partial)


async def test_retryable_failure_is_naked_then_succeeds(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    await net.publish("only")
    async with net.pipeline(FlakyRuntime(1)) as pipe:
        await wait_for(lambda: pipe.completed == 1, timeout=30)
    (res,) = await results(net.js, net.settings)
    assert res.attempt == 2
    (err,) = await errors(net.js, net.settings)
    assert err.retryable and err.code == ErrorCode.RUNTIME_FAILURE and err.attempt == 1


async def test_last_delivery_is_terminated_with_final_error(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path, max_deliver=2)
    await net.publish("doomed")
    async with net.pipeline(FlakyRuntime(99)):

        async def two_errors() -> bool:
            return len(await errors(net.js, net.settings)) == 2 and await queue_empty(
                nc, net.settings
            )

        await wait_for(two_errors, timeout=30)
    errs = await errors(net.js, net.settings)
    assert [e.retryable for e in errs] == [True, False]
    assert "last delivery" in errs[1].message
    assert await results(net.js, net.settings) == []


async def test_drain_hands_back_unfinished_jobs(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    for i in range(5):
        await net.publish(f"slow-{i}")
    runtime = BlockingRuntime()
    pipe = net.pipeline(runtime)
    await pipe.__aenter__()
    await wait_for(lambda: runtime.calls == 5, timeout=10)
    await pipe.drain(0.5)
    assert sorted(runtime.cancelled) == [f"slow-{i}" for i in range(5)]  # aborted
    # handed back: a fresh pipeline gets all five and finishes them
    async with net.pipeline(EchoRuntime()) as again:
        await wait_for(lambda: again.completed == 5, timeout=20)
    got = sorted(r.job_id for r in await results(net.js, net.settings))
    assert got == [f"slow-{i}" for i in range(5)]


async def test_long_job_keeps_its_lease_with_progress_acks(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path, ack_wait_s=1.0)
    await net.publish("long")
    runtime = EchoRuntime(delay_s=3.0)
    async with net.pipeline(runtime) as pipe:
        await wait_for(lambda: pipe.completed == 1, timeout=20)
    (res,) = await results(net.js, net.settings)
    assert res.attempt == 1, "without in-progress acks the job would have been redelivered"
    assert runtime.calls == 1


class StuckRuntime(EchoRuntime):
    """A runtime call that cannot be cut short (a blocking call in a thread, say)."""

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        self.calls += 1
        await finish_uncancellable(asyncio.sleep(self.delay_s))
        return self.answer(item)


async def test_lease_is_not_extended_past_the_run_deadline(nc: Client, tmp_path: Path) -> None:
    """In-progress acks stop at the job's deadline: a job stuck past it goes back to the
    server (here it is redelivered, and rejected as past its deadline)."""
    net = await provisioned(nc, tmp_path, ack_wait_s=1.0)
    await net.publish("stuck", deadline=time.time() + 1.0)
    async with net.pipeline(StuckRuntime(delay_s=6.0)):

        async def redelivered() -> bool:
            errs = await errors(net.js, net.settings)
            return any(e.attempt and e.attempt > 1 for e in errs)

        await wait_for(redelivered, timeout=20)
    assert await results(net.js, net.settings) == []


def test_extends_lease_until_the_run_deadline() -> None:
    record = InFlight(msg=None, attempt=1, stream_seq=1, input_sha256="", received=0.0)  # type: ignore[arg-type]
    assert extends_lease(record, time.time())
    record.lease_until = 100.0
    assert extends_lease(record, 99.0) and not extends_lease(record, 100.0)


async def test_stream_messages_concatenate_to_the_result(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    got: list[StreamBody] = []
    last = asyncio.Event()

    async def on_stream(msg: Msg) -> None:
        env = verify(msg.data, expect=EnvelopeType.STREAM)
        body = validate(StreamBody, env.body)
        got.append(body)
        if body.finish_reason is not None:
            last.set()

    sub = await nc.subscribe(net.settings.subject("stream", "streamy"), cb=on_stream)
    await net.publish("streamy", stream=True)
    async with net.pipeline(EchoRuntime(token_delay_s=0.01, tokens=12)) as pipe:
        await asyncio.wait_for(last.wait(), 20)
        await wait_for(lambda: pipe.completed == 1, timeout=20)
    await sub.unsubscribe()
    (res,) = await results(net.js, net.settings)
    assert [b.seq for b in got] == list(range(len(got))) and len(got) > 1
    assert all(b.attempt == 1 and b.node_id == net.key.node_id for b in got)
    assert [t for b in got for t in b.token_ids] == res.output.token_ids
    assert "".join(b.text for b in got) == res.output.text
    assert got[-1].finish_reason == res.output.finish_reason


async def test_cancel_aborts_a_running_job(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    runtime = BlockingRuntime()
    await net.publish("victim")
    async with net.pipeline(runtime):
        await runtime.started.wait()
        await net.cancel("victim")
        await net.final_error(ErrorCode.CANCELLED)
        await wait_for(lambda: queue_empty(nc, net.settings), timeout=10)
    assert runtime.cancelled == ["victim"]
    assert await results(net.js, net.settings) == []


async def test_a_cancel_in_the_turn_a_job_starts_ends_it_and_frees_its_slot(
    nc: Client, tmp_path: Path
) -> None:
    """A job cancelled in the turn its request is submitted: the job still ends with
    CANCELLED, and its runtime slot (the only one) goes to the next job."""
    net = await provisioned(nc, tmp_path, runtime_max_active=1)
    runtime = EchoRuntime()
    async with net.pipeline(runtime) as pipe:
        start = pipe._start

        def start_then_cancel(record: InFlight) -> None:
            start(record)
            pipe._stop(record, Cancelled(f"job {record.job_id} was cancelled"))

        pipe._start = start_then_cancel  # type: ignore[method-assign]
        await net.publish("racy")
        await net.final_error(ErrorCode.CANCELLED)
        pipe._start = start  # type: ignore[method-assign]
        await net.publish("next")

        async def next_done() -> bool:
            return pipe.completed == 1 and await queue_empty(nc, net.settings)

        await wait_for(next_done, timeout=20)
    assert runtime.calls == 1
    assert [r.job_id for r in await results(net.js, net.settings)] == ["next"]


async def test_cancel_before_the_job_arrives_applies_on_admission(
    nc: Client, tmp_path: Path
) -> None:
    net = await provisioned(nc, tmp_path)
    runtime = EchoRuntime()
    async with net.pipeline(runtime) as pipe:
        await net.cancel("early")
        await net.publish("early")
        await net.publish("other")
        await net.final_error(ErrorCode.CANCELLED)
        await wait_for(lambda: pipe.completed == 1, timeout=20)
    assert runtime.calls == 1
    assert [r.job_id for r in await results(net.js, net.settings)] == ["other"]


async def test_deadline_aborts_a_running_job(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    runtime = BlockingRuntime()
    await net.publish("late", deadline=time.time() + 1.0)
    async with net.pipeline(runtime):
        await runtime.started.wait()
        await net.final_error(ErrorCode.DEADLINE_EXCEEDED)
    assert runtime.cancelled == ["late"]
    assert await results(net.js, net.settings) == []


async def test_client_follows_the_stream_and_can_cancel(nc: Client, tmp_path: Path) -> None:
    net = await provisioned(nc, tmp_path)
    got: list[StreamBody] = []
    finished = asyncio.Event()

    def sink(body: StreamBody) -> None:
        got.append(body)
        if body.finish_reason is not None:
            finished.set()

    async with net.pipeline(EchoRuntime(token_delay_s=0.01, tokens=12)):
        body = {"job_id": "cli", "model_id": "demo", "prompt": "x", "stream": True}
        outcome = await submit(nc, net.settings, body, wait_s=30, on_stream=sink)
        await asyncio.wait_for(finished.wait(), 10)
    assert [t for b in got for t in b.token_ids] == outcome.result.output.token_ids
    assert "".join(b.text for b in got) == outcome.result.output.text

    runtime = BlockingRuntime()
    async with net.pipeline(runtime):
        body = {"job_id": "unwanted", "model_id": "demo", "prompt": "x"}
        waiting = asyncio.ensure_future(submit(nc, net.settings, body, wait_s=30))
        await runtime.started.wait()
        await cancel(nc, net.settings, "unwanted")
        with pytest.raises(JobFailed, match="CANCELLED"):
            await waiting
    assert runtime.cancelled == ["unwanted"]


async def test_a_flood_of_cancels_for_unknown_jobs_is_counted_not_logged(
    nc: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client may cancel any id: 20,000 cancels for jobs this node never held cost a
    line or two of log (they wrote one line each), and are counted."""
    caplog.set_level(logging.INFO, logger=pipeline_module.__name__)
    monkeypatch.setattr(pipeline_module, "CANCEL_SUMMARY_S", 1.0)
    net = await provisioned(nc, tmp_path)
    runtime = BlockingRuntime()
    flood = 20_000
    await net.publish("held")
    async with net.pipeline(runtime) as pipe:
        await runtime.started.wait()
        for i in range(flood):
            await nc.publish(net.settings.subject("cancel", f"unknown-{i}"), b"")
        await net.cancel("held")  # a job it holds: still its own line, still cancelled
        await net.final_error(ErrorCode.CANCELLED)
        await wait_for(lambda: pipe.cancels_unheld == flood, timeout=60)
    messages = [r.getMessage() for r in caplog.records if r.name == pipeline_module.__name__]
    unheld = [m for m in messages if m.startswith("job_cancel_unheld ")]
    summaries = [m for m in messages if m.startswith("job_cancels_unheld ")]
    assert unheld == ["job_cancel_unheld job_id=unknown-0"]
    counted = sum(int(m.split("count=")[1].split()[0]) for m in summaries)
    assert counted == flood - 1  # every one is in a summary once the pipeline closed
    assert len(summaries) < flood / 100
    assert "job_cancel_received job_id=held" in messages
