"""The job pipeline against a real nats-server: exactly one outcome per job, nothing lost."""

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from schemas.event import ErrorCode
from tests.support.jobnet import EchoRuntime, errors, job, publish_job, queue_empty, results
from tests.support.polling import wait_for
from worker.core.errors import RuntimeEnded
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import ItemOutcome, WorkItem

pytestmark = pytest.mark.nats

SERVING = Serving("demo", "1", "a" * 64, "sha256:" + "1" * 64, 7)


def settings_for(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        key_file=tmp_path / "node.key",
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        ack_wait_s=5.0,
        max_deliver=3,
        max_job_bytes=16 * 1024,
        batch_max_wait_ms=2.0,
        shutdown_grace_s=5.0,
    )
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


async def test_mixed_jobs_get_exactly_one_outcome_each(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    key = NodeKey.generate()
    runtime = EchoRuntime()
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
        await publish_job(js, settings, "demo", data, jid)

    async with Pipeline(nc, settings, Publisher(nc, js, key, settings), runtime, SERVING) as pipe:

        async def done() -> bool:
            return pipe.completed == len(valid) and await queue_empty(nc, settings)

        await wait_for(done)
        got = await results(js, settings)
        errs = await errors(js, settings)

    assert sorted(r.job_id for r in got) == sorted(valid)
    assert all(r.node_id == key.node_id and r.config_version == 7 for r in got)
    assert all(r.model.sha256 == "a" * 64 and r.runtime.engine == "echo" for r in got)
    assert len(errs) == len(invalid)
    assert all(not e.retryable for e in errs)
    # even undecodable jobs are named, by their Nats-Msg-Id
    assert {e.job_id: e.code for e in errs} == invalid
    assert max(runtime.batches) > 1, "jobs should be batched"


class FlakyRuntime(EchoRuntime):
    """Fails every batch with a retryable error the first `failures` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        if self.failures > 0:
            self.failures -= 1
            return [RuntimeEnded("runtime exited with code 137") for _ in items]
        return await super().run(items)


async def test_retryable_failure_is_naked_then_succeeds(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    key = NodeKey.generate()
    await publish_job(js, settings, "demo", job("only"), "only")
    async with Pipeline(
        nc, settings, Publisher(nc, js, key, settings), FlakyRuntime(1), SERVING
    ) as pipe:
        await wait_for(lambda: _eq(pipe.completed, 1), timeout=30)
    (res,) = await results(js, settings)
    assert res.attempt == 2
    (err,) = await errors(js, settings)
    assert err.retryable and err.code == ErrorCode.RUNTIME_FAILURE and err.attempt == 1


async def test_last_delivery_is_terminated_with_final_error(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_deliver=2)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    key = NodeKey.generate()
    await publish_job(js, settings, "demo", job("doomed"), "doomed")
    async with Pipeline(nc, settings, Publisher(nc, js, key, settings), FlakyRuntime(99), SERVING):

        async def two_errors() -> bool:
            return len(await errors(js, settings)) == 2 and await queue_empty(nc, settings)

        await wait_for(two_errors, timeout=30)
    errs = await errors(js, settings)
    assert [e.retryable for e in errs] == [True, False]
    assert "last delivery" in errs[1].message
    assert await results(js, settings) == []


async def test_drain_hands_back_unfinished_jobs(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    key = NodeKey.generate()
    for i in range(5):
        await publish_job(js, settings, "demo", job(f"slow-{i}"), f"slow-{i}")
    pipe = Pipeline(
        nc, settings, Publisher(nc, js, key, settings), EchoRuntime(delay_s=30), SERVING
    )
    await pipe.__aenter__()
    await wait_for(lambda: _eq(pipe.in_flight, 5), timeout=10)
    started = time.monotonic()
    await pipe.drain(0.5)
    assert time.monotonic() - started < 5
    # handed back: a fresh pipeline gets all five and finishes them
    async with Pipeline(
        nc, settings, Publisher(nc, js, key, settings), EchoRuntime(), SERVING
    ) as again:
        await wait_for(lambda: _eq(again.completed, 5), timeout=20)
    assert sorted(r.job_id for r in await results(js, settings)) == [f"slow-{i}" for i in range(5)]


async def test_long_job_keeps_its_lease_with_progress_acks(nc: Client, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, ack_wait_s=1.0)
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    key = NodeKey.generate()
    await publish_job(js, settings, "demo", job("long"), "long")
    runtime = EchoRuntime(delay_s=3.0)
    async with Pipeline(nc, settings, Publisher(nc, js, key, settings), runtime, SERVING) as pipe:
        await wait_for(lambda: _eq(pipe.completed, 1), timeout=20)
    (res,) = await results(js, settings)
    assert res.attempt == 1, "without in-progress acks the job would have been redelivered"
    assert runtime.batches == [1]


async def _eq(a: int, b: int) -> bool:
    await asyncio.sleep(0)
    return a == b
