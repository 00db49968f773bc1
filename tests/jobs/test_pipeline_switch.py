"""A model switch, the pipeline's side, against a real nats-server: stop pulling, let jobs
in flight finish up to a grace, hand back the rest with no error event, pull from another
model's consumer; and a revoked model, handed back at once. Nothing is lost or duplicated."""

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.support.jobnet import EchoRuntime, errors, job, publish_job, queue_empty, results
from tests.support.pipeline import SERVING, settings_for
from tests.support.polling import wait_for
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.intake import JobSource
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import consumer_name, provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, PartialSink, WorkItem

pytestmark = pytest.mark.nats

OTHER = Serving("other", "3", "b" * 64, SERVING.image, SERVING.config_version)


class GatedRuntime(EchoRuntime):
    """A request whose job id has a gate waits until the gate opens (or it is aborted);
    `running` holds the ids of the requests under way."""

    def __init__(self, *gated: str) -> None:
        super().__init__()
        self.gates = {job_id: asyncio.Event() for job_id in gated}
        self.running: set[str] = set()

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        self.running.add(item.job_id)
        try:
            gate = self.gates.get(item.job_id)
            if gate is not None:
                try:
                    await gate.wait()
                except asyncio.CancelledError:
                    self.cancelled.append(item.job_id)
                    raise
            return await super().generate(item, on_partial)
        finally:
            self.running.discard(item.job_id)


async def setup(nc: Client, tmp_path: Path) -> tuple[Settings, Publisher]:
    settings = settings_for(tmp_path)
    await provision(nc.jetstream(), settings, ["demo", "other"])
    return settings, Publisher(nc, nc.jetstream(), NodeKey.generate(), settings)


async def nak_spy(nc: Client, settings: Settings) -> list[str]:
    """The ack subjects of the naks sent for the jobs stream's messages from now on."""
    naks: list[str] = []

    async def on_ack(msg: Msg) -> None:
        if msg.data.startswith(b"-NAK"):
            naks.append(msg.subject)

    await nc.subscribe(f"$JS.ACK.{settings.stream('JOBS')}.>", cb=on_ack)
    return naks


async def consumer(nc: Client, settings: Settings, model: str) -> tuple[int, int, int]:
    """A model's consumer: (jobs never delivered, jobs delivered and not acked or termed,
    open pull requests). A nak'ed job counts as delivered until it is redelivered."""
    info = await nc.jetstream().consumer_info(
        settings.stream("JOBS"), consumer_name(settings, model)
    )
    return info.num_pending, info.num_ack_pending, info.num_waiting


async def test_a_switch_finishes_short_jobs_and_hands_back_long_ones(
    nc: Client, tmp_path: Path
) -> None:
    settings, publisher = await setup(nc, tmp_path)
    js = nc.jetstream()
    for job_id in ("short", "long"):
        await publish_job(js, settings, "demo", job(job_id), job_id)
    runtime = GatedRuntime("short", "long")
    async with Pipeline(nc, settings, publisher, runtime, SERVING) as pipe:
        await wait_for(lambda: runtime.running == {"short", "long"}, timeout=10)
        draining = asyncio.ensure_future(pipe.drain(5.0))
        await wait_for(lambda: not pipe.pulling, timeout=10)
        runtime.gates["short"].set()  # finishes within the grace; "long" does not
        assert await draining == 1
        assert runtime.cancelled == ["long"] and pipe.completed == 1 and pipe.in_flight == 0

        # Paused: a new job of the old model stays queued (the server keeps no pull request
        # of ours open); the other model's jobs are pulled once the pipeline resumes on its
        # consumer.
        assert (await consumer(nc, settings, "demo"))[2] == 0
        await publish_job(js, settings, "demo", job("later"), "later")
        await publish_job(js, settings, "other", job("o-1", model="other"), "o-1")
        await pipe.resume(OTHER)
        await wait_for(lambda: pipe.completed == 2, timeout=10)
        # "later" not delivered, "long" waiting for its redelivery, no pull request open
        assert await consumer(nc, settings, "demo") == (1, 1, 0)

        assert await pipe.drain(5.0) == 0
        runtime.gates["long"].set()
        await pipe.resume(SERVING)
        await wait_for(lambda: pipe.completed == 4, timeout=20)
        await wait_for(lambda: queue_empty(nc, settings), timeout=10)

    got = {(r.job_id, r.attempt, r.model.id) for r in await results(js, settings)}
    assert got == {
        ("short", 1, "demo"),
        ("o-1", 1, "other"),
        ("long", 2, "demo"),  # handed back, run again
        ("later", 1, "demo"),
    }
    assert await errors(js, settings) == []  # a hand-back is not a failure


async def test_a_revoked_model_hands_back_everything_at_once(nc: Client, tmp_path: Path) -> None:
    settings, publisher = await setup(nc, tmp_path)
    js = nc.jetstream()
    ids = [f"r-{i}" for i in range(4)]
    for job_id in ids:
        await publish_job(js, settings, "demo", job(job_id), job_id)
    runtime = GatedRuntime(*ids)
    async with Pipeline(nc, settings, publisher, runtime, SERVING) as pipe:
        await wait_for(lambda: len(runtime.running) == 4, timeout=10)
        assert await pipe.drain(0) == 4
        assert sorted(runtime.cancelled) == ids and pipe.in_flight == 0
        assert await consumer(nc, settings, "demo") == (0, 4, 0)  # handed back, not pulled
        for gate in runtime.gates.values():
            gate.set()
        await pipe.resume(SERVING)
        await wait_for(lambda: pipe.completed == 4, timeout=20)
    got = sorted((r.job_id, r.attempt) for r in await results(js, settings))
    assert got == [(job_id, 2) for job_id in ids]
    assert await errors(js, settings) == []


async def test_resume_needs_a_drained_pipeline(nc: Client, tmp_path: Path) -> None:
    settings, publisher = await setup(nc, tmp_path)
    async with Pipeline(nc, settings, publisher, EchoRuntime(), SERVING) as pipe:
        with pytest.raises(RuntimeError, match="drained"):
            await pipe.resume(OTHER)
        await pipe.pause()
        assert not pipe.pulling
        await pipe.resume(OTHER)
        assert pipe.pulling and pipe.serving is OTHER


async def test_a_close_without_a_drain_hands_back_with_no_error_event(
    nc: Client, tmp_path: Path
) -> None:
    settings, publisher = await setup(nc, tmp_path)
    js = nc.jetstream()
    ids = ["c-0", "c-1"]
    for job_id in ids:
        await publish_job(js, settings, "demo", job(job_id), job_id)
    runtime = GatedRuntime(*ids)
    pipe = Pipeline(nc, settings, publisher, runtime, SERVING)
    await pipe.__aenter__()
    await wait_for(lambda: len(runtime.running) == 2, timeout=10)
    await pipe.aclose()  # a crash of its owner, say: no drain first
    assert sorted(runtime.cancelled) == ids and pipe.in_flight == 0
    async with Pipeline(nc, settings, publisher, EchoRuntime(), SERVING) as again:
        await wait_for(lambda: again.completed == 2, timeout=20)
    assert sorted((r.job_id, r.attempt) for r in await results(js, settings)) == [
        (job_id, 2) for job_id in ids
    ]
    assert await errors(js, settings) == []


async def test_jobs_delivered_but_not_taken_when_pulling_stops_are_handed_back(
    nc: Client, tmp_path: Path
) -> None:
    """Jobs the server delivered that still wait in the client's queue when the source
    stops are nak'ed, so another node takes them at once. A plain `unsubscribe()` discarded
    them: the server held them as delivered until their ack wait ran out."""
    settings, _ = await setup(nc, tmp_path)
    js = nc.jetstream()
    ids = [f"q-{i}" for i in range(4)]
    for job_id in ids:
        await publish_job(js, settings, "demo", job(job_id), job_id)
    naks = await nak_spy(nc, settings)
    taken: list[Msg] = []
    gate = asyncio.Event()

    async def on_message(msg: Msg) -> None:
        taken.append(msg)
        await gate.wait()  # the first job holds the callback: the others queue behind it

    source = JobSource(
        nc,
        stream=settings.stream("JOBS"),
        consumer=consumer_name(settings, "demo"),
        credit=lambda: 16,
        on_message=on_message,
    )
    pulling = asyncio.ensure_future(source.run())
    await wait_for(lambda: len(taken) == 1, timeout=10)

    async def all_delivered() -> bool:
        return (await consumer(nc, settings, "demo"))[:2] == (0, 4)

    await wait_for(all_delivered, timeout=10)
    await nc.flush()  # the three others are read: they wait in the subscription's queue
    source.stop()
    await wait_for(lambda: source._sub is None, timeout=10)  # it let its subscription go
    gate.set()
    await asyncio.wait_for(pulling, 10)
    await wait_for(lambda: len(naks) == 3, timeout=10)
    assert len(taken) == 1


async def test_a_close_after_the_settle_task_ended_still_sends_its_naks(
    nc: Client, tmp_path: Path
) -> None:
    """A task group that failed has cancelled the settle task; a close then hands back what
    is held all the same. It waited for the ended task no longer (it did, 10 s), but the
    naks it decided were never sent: the jobs waited out their ack wait."""
    settings, publisher = await setup(nc, tmp_path)
    js = nc.jetstream()
    ids = ["e-0", "e-1"]
    for job_id in ids:
        await publish_job(js, settings, "demo", job(job_id), job_id)
    naks = await nak_spy(nc, settings)
    runtime = GatedRuntime(*ids)
    pipe = Pipeline(nc, settings, publisher, runtime, SERVING)
    await pipe.__aenter__()
    await wait_for(lambda: len(runtime.running) == 2, timeout=10)
    settler = pipe._settler
    assert settler is not None
    settler.cancel()  # as a task group that failed does
    await asyncio.wait([settler])
    await pipe.aclose()
    assert sorted(runtime.cancelled) == ids and pipe.in_flight == 0
    await wait_for(lambda: len(naks) == 2, timeout=10)
    assert await errors(js, settings) == []
