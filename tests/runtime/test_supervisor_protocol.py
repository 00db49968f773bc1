"""The supervisor against real runtimes: the echo engine (with its fault injection) and
`tests/support/fake_runtime.py`, through both backends: Docker containers and local processes."""

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_runtime_image import FAKE_COMMAND, echo_image, ensure_test_image
from tests.support.polling import wait_for
from tests.support.settings import MODEL_SHA, NODE_ID, make_settings
from tests.support.streaming import Sink, streaming
from worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    ItemFailed,
    NodeError,
    RuntimeBroken,
    RuntimeClosed,
    RuntimeEnded,
    RuntimeFailure,
    RuntimeStartError,
    RuntimeTimeout,
)
from worker.core.resource import ResourceState
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.container import LABEL_NODE, DockerBackend
from worker.runtime.process import ProcessBackend
from worker.runtime.supervisor import Supervisor
from worker.runtime.transport import Backend

ROOT = Path(__file__).resolve().parents[2]
FAKE_LOCAL = ["python3", str(ROOT / "tests" / "support" / "fake_runtime.py")]

BackendFactory = Callable[..., Backend]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir(mode=0o755)
    (model / "model.bin").write_bytes(b"tiny model\n" * 100)
    (model / "model.bin").chmod(0o644)
    model.chmod(0o755)
    return model


class Harness:
    """Builds supervisors on one backend kind and checks for leftovers."""

    def __init__(self, kind: str, model_dir: Path, docker_client: Any = None) -> None:
        self.kind = kind
        self.model_dir = model_dir
        self.client = docker_client
        self.image = echo_image(docker_client) if docker_client else "local"
        self.fake_image = ensure_test_image(docker_client) if docker_client else "local"
        self.pids: list[int] = []

    def spec(self, **engine_args: Any) -> LaunchSpec:
        return LaunchSpec(
            engine="echo",
            image=self.image,
            model_dir=self.model_dir,
            model_sha256=MODEL_SHA,
            engine_args=engine_args,
        )

    def backend(
        self, settings: Settings, *, fake: str | None = None, env: dict[str, str] | None = None
    ) -> Backend:
        extra = dict(env or {})
        if fake:
            extra["RST_FAKE_MODE"] = fake
        if self.kind == "docker":
            return DockerBackend(
                settings,
                node_id=NODE_ID,
                client=self.client,
                command=FAKE_COMMAND if fake else None,
                extra_env=extra,
            )
        extra["PYTHONPATH"] = str(ROOT)
        if fake:
            return ProcessBackend(settings, command=FAKE_LOCAL, extra_env=extra)
        return ProcessBackend(settings, extra_env=extra)

    def supervisor(
        self,
        *,
        fake: str | None = None,
        env: dict[str, str] | None = None,
        engine_args: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Supervisor:
        config = make_settings(fast_runtime=True, **settings)
        spec = self.spec(**(engine_args or {}))
        if fake:
            spec = dataclasses.replace(spec, image=self.fake_image)
        return Supervisor(config, self.backend(config, fake=fake, env=env), spec)

    def remember(self, sup: Supervisor) -> None:
        ident = sup.stats().runtime_id
        if ident and ident.startswith("pid:"):
            self.pids.append(int(ident[4:]))

    def leftovers(self) -> list[str]:
        if self.kind == "docker":
            found = self.client.containers.list(
                all=True, filters={"label": f"{LABEL_NODE}={NODE_ID}"}
            )
            return [c.id for c in found]
        alive = []
        for pid in self.pids:
            try:
                os.kill(pid, 0)
                alive.append(str(pid))
            except ProcessLookupError:
                pass
        return alive

    def kill_runtime(self, ident: str) -> None:
        if self.kind == "docker":
            self.client.containers.get(ident).kill()
        else:
            os.kill(int(ident[4:]), signal.SIGKILL)


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def harness(request: pytest.FixtureRequest, model_dir: Path) -> Any:
    client = request.getfixturevalue("docker_client") if request.param == "docker" else None
    h = Harness(request.param, model_dir, client)
    if client is not None:
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_NODE}={NODE_ID}"}
        ):
            container.remove(force=True)
    yield h
    assert h.leftovers() == []


def items(*prompts: str, max_tokens: int = 4) -> list[WorkItem]:
    return [
        WorkItem(
            job_id=f"job-{i}",
            request={"prompt": p, "params": {"max_tokens": max_tokens, "seed": i}},
        )
        for i, p in enumerate(prompts)
    ]


def assert_all(outcomes: list[Any], kind: type[NodeError]) -> None:
    assert outcomes and all(isinstance(o, kind) and o.retryable for o in outcomes), outcomes


async def test_round_trip(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        out = await sup.run(items("hello", "world", "again"))
        assert [type(o) for o in out] == [Completion] * 3
        assert [o.job_id for o in out if isinstance(o, Completion)] == ["job-0", "job-1", "job-2"]
        assert sup.facts.engine == "echo" and sup.facts.model_sha256 == MODEL_SHA
        assert sup.facts.image == harness.image and sup.facts.max_active == 256
        assert sup.facts.engine_version and sup.facts.device
        again = await sup.generate(items("hello")[0])
        assert isinstance(out[0], Completion)
        assert (again.token_ids, again.text) == (out[0].token_ids, out[0].text)
        stats = sup.stats()
        assert stats.requests == 4 and stats.restarts == 0 and stats.runtime_id
        assert stats.active == 0
        assert await sup.run([]) == []


async def test_short_job_completes_while_a_long_one_runs(harness: Harness) -> None:
    async with harness.supervisor(engine_args={"token_delay_ms": 2}) as sup:
        harness.remember(sup)
        sink = Sink()
        long = asyncio.ensure_future(sup.generate(streaming("long", max_tokens=2000), sink))
        await sink.first.wait()
        short = await sup.generate(items("short")[0])
        assert isinstance(short, Completion) and not long.done()
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long


async def test_streamed_tokens_concatenate_to_the_result(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        sink = Sink()
        done = await sup.generate(streaming("s", "stream me", max_tokens=20), sink)
        assert len(done.token_ids) == 20 and len(sink.parts) == 19
        assert sink.token_ids == done.token_ids[:19]
        assert done.text.startswith("".join(p.text for p in sink.parts))
        assert done.first_token_s >= 0


async def test_cancel_aborts_the_request_in_the_engine(harness: Harness) -> None:
    async with harness.supervisor(engine_args={"token_delay_ms": 2}) as sup:
        harness.remember(sup)
        sink = Sink()
        task = asyncio.ensure_future(sup.generate(streaming("c"), sink))
        await sink.first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the runtime answers the abort (`failed`, aborted): nothing is left pending
        await wait_for(lambda: sup.stats().aborting == 0, timeout=20)
        assert sup.stats().active == 0 and sup.stats().restarts == 0
        assert isinstance(await sup.generate(items("after")[0]), Completion)


async def test_deadline_mid_run_ends_the_request(harness: Harness) -> None:
    async with harness.supervisor(engine_args={"token_delay_ms": 2}) as sup:
        harness.remember(sup)
        payload = {"prompt": "long", "params": {"max_tokens": 100_000}}
        item = WorkItem("d", payload, deadline=time.time() + 0.5)
        with pytest.raises(DeadlineExceeded):
            await sup.generate(item)
        assert sup.stats().restarts == 0


async def test_a_job_past_its_run_time_is_aborted_alone(harness: Harness) -> None:
    """A runtime that answers pings is healthy: a job without a deadline that runs past
    request_timeout_s fails alone (DeadlineExceeded, final), the job that runs beside it
    goes on, and the runtime is not replaced (it was, with every job on it, before)."""
    async with harness.supervisor(
        engine_args={"token_delay_ms": 2}, request_timeout_s=3.0, ping_interval_s=0.5
    ) as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        long_sink, mate_sink = Sink(), Sink()
        long = sup.submit(streaming("long"), long_sink)
        await wait_for(lambda: len(long_sink.token_ids) >= 300, timeout=20)
        mate = sup.submit(streaming("mate"), mate_sink)  # due later by the 300 tokens
        with pytest.raises(DeadlineExceeded, match="request_timeout_s") as overran:
            await long
        assert not overran.value.retryable
        assert not mate.done() and mate_sink.parts
        mate.cancel()
        await wait_for(lambda: sup.stats().aborting == 0 and sup.stats().active == 0, timeout=20)
        assert isinstance(await sup.generate(items("after")[0]), Completion)
        assert sup.stats().runtime_id == ident and sup.stats().restarts == 0


async def test_a_job_of_death_fails_alone_and_the_runtime_serves_on(harness: Harness) -> None:
    """One job asking for more tokens than a result can carry (300,000) broke every runtime
    that ran it, and its batch-mates with it. Past admission (which refuses it), the
    runtime refuses it too: that job's `BadRequest`, nothing else."""
    async with harness.supervisor() as sup:
        harness.remember(sup)
        death = WorkItem("death", {"prompt": "p", "params": {"max_tokens": 300_000}})
        out = await sup.run([*items("a", "b"), death])
        assert [type(o) for o in out] == [Completion, Completion, BadRequest], out
        assert "max_tokens" in str(out[2]) and not out[2].retryable
        assert sup.stats().restarts == 0


async def test_item_error_fails_only_that_job(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        out = await sup.run(items("fine", "!fault:error", "fine too", "!fault:bad_request"))
        assert isinstance(out[0], Completion) and isinstance(out[2], Completion)
        assert isinstance(out[1], ItemFailed) and not out[1].retryable
        assert isinstance(out[3], BadRequest) and not out[3].retryable
        assert sup.stats().restarts == 0


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("crash", RuntimeEnded),
        ("garbage", RuntimeBroken),
        ("oversize", RuntimeBroken),
        ("unknown_id", RuntimeBroken),
        ("done_twice", RuntimeBroken),
        ("out_of_order", RuntimeBroken),
        ("endless", RuntimeBroken),
    ],
)
async def test_fault_replaces_runtime(
    harness: Harness, fault: str, error: type[RuntimeFailure]
) -> None:
    async with harness.supervisor(engine_args={"token_delay_ms": 10}) as sup:
        harness.remember(sup)
        first = sup.stats().runtime_id
        batch = [*items("a", "b"), streaming("poison", f"!fault:{fault}", max_tokens=4)]
        out = await sup.run(batch)
        if fault not in ("done_twice", "out_of_order"):  # those answered before they broke
            assert isinstance(out[2], error) and out[2].retryable, out
        # the others were in flight when it broke: handed back, or done before it
        assert all(isinstance(o, Completion | error) for o in out[:2]), out
        await wait_for(lambda: sup.stats().runtime_id not in (None, first), timeout=20)
        harness.remember(sup)
        assert sup.stats().restarts == 1
        assert [type(o) for o in await sup.run(items("after"))] == [Completion]


async def test_hung_runtime_is_replaced_by_the_ping_timeout(harness: Harness) -> None:
    async with harness.supervisor(ping_interval_s=0.5, ping_timeout_s=1.0) as sup:
        harness.remember(sup)
        first = sup.stats().runtime_id
        sink = Sink()
        with pytest.raises(RuntimeTimeout, match="pong"):
            await sup.generate(streaming("hang", "!fault:hang", max_tokens=10), sink)
        assert len(sink.parts) == 2  # it hung mid-generation
        harness.remember(sup)
        assert sup.stats().runtime_id not in (None, first)
        assert [type(o) for o in await sup.run(items("after"))] == [Completion]


async def test_runtime_that_stops_reading_is_replaced(harness: Harness) -> None:
    """Every write has a deadline: a runtime that takes no input cannot block the agent."""
    async with harness.supervisor(fake="deaf", runtime_write_timeout_s=1.0) as sup:
        harness.remember(sup)
        big = [WorkItem(f"big-{i}", {"prompt": "x" * 200_000, "params": {}}) for i in range(40)]
        out = await sup.run(big)
        assert_all(out, RuntimeFailure)  # handed back
        assert any(
            isinstance(o, RuntimeTimeout) and "runtime_write_timeout_s" in str(o) for o in out
        ), out
        assert sup.stats().restarts >= 1
        harness.remember(sup)


async def test_fatal_frame_replaces_runtime(harness: Harness) -> None:
    async with harness.supervisor(fake="fatal") as sup:
        harness.remember(sup)
        out = await sup.run(items("x"))
        assert_all(out, RuntimeEnded)
        assert "fatal" in str(out[0])
        harness.remember(sup)
        assert sup.stats().restarts == 1


async def test_never_ready_fails_start_with_advice(harness: Harness) -> None:
    sup = harness.supervisor(env={"RESULTITY_ECHO_FAULT": "noready"}, runtime_ready_timeout_s=1.0)
    with pytest.raises(RuntimeStartError, match="RESULTITY_RUNTIME_READY_TIMEOUT_S"):
        async with sup:
            pass
    assert sup.state is ResourceState.CLOSED


async def test_a_runtime_that_floods_before_ready_fails_its_start_within_its_deadlines(
    harness: Harness,
) -> None:
    """Issue 20 item 4: a 32 MiB frame before `ready`, then stdin never read. The start
    fails with the frame's error within the runtime's own deadlines (before the fix, the
    Docker backend's removal waited for its API's 60 s read timeout), and leaves nothing."""
    sup = harness.supervisor(fake="flood")
    settings = make_settings(fast_runtime=True)
    bound_s = settings.runtime_ready_timeout_s + settings.runtime_stop_timeout_s
    async with asyncio.timeout(bound_s):
        with pytest.raises(RuntimeStartError, match="frame"):
            async with sup:
                pass
    assert sup.state is ResourceState.CLOSED


async def test_protocol_version_mismatch(harness: Harness) -> None:
    with pytest.raises(RuntimeStartError, match="protocol 99"):
        async with harness.supervisor(fake="badproto"):
            pass


async def test_poison_job_runs_alone_then_fails_alone(harness: Harness) -> None:
    prompts = ("a", "b", "c", "!fault:crash", "e", "f")
    async with harness.supervisor(engine_args={"token_delay_ms": 20}) as sup:
        harness.remember(sup)
        for _ in range(2):  # two deaths with all six in flight: all handed back
            out = await sup.run(items(*prompts))
            assert_all(out, RuntimeEnded)
            harness.remember(sup)
        third = await sup.run(items(*prompts))  # each runs alone now
        harness.remember(sup)
        poison = third[3]
        assert isinstance(poison, ItemFailed) and not poison.retryable
        assert "the last time alone" in str(poison)
        others = third[:3] + third[4:]
        assert [o.job_id for o in others if isinstance(o, Completion)] == [
            "job-0",
            "job-1",
            "job-2",
            "job-4",
            "job-5",
        ]
        assert sup.stats().restarts == 3
        assert [type(o) for o in await sup.run(items("later", "again"))] == [Completion] * 2


async def test_killed_mid_request(harness: Harness) -> None:
    async with harness.supervisor(engine_args={"token_delay_ms": 5}) as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        assert ident is not None
        sink = Sink()
        task = asyncio.ensure_future(sup.generate(streaming("k"), sink))
        await sink.first.wait()
        await asyncio.to_thread(harness.kill_runtime, ident)
        with pytest.raises(RuntimeEnded):
            await task
        harness.remember(sup)
        assert sup.stats().runtime_id != ident


async def test_submitted_request_cancelled_is_aborted_in_the_engine(harness: Harness) -> None:
    """`submit` (the pipeline's way: no task per request): cancelling its future aborts
    the request, and releases its place."""
    async with harness.supervisor(engine_args={"token_delay_ms": 2}) as sup:
        harness.remember(sup)
        sink = Sink()
        answer = sup.submit(streaming("c"), sink)
        assert sup.stats().active == 1
        await sink.first.wait()
        answer.cancel()
        # released at once, then aborting until the runtime answers the abort
        await wait_for(lambda: sup.stats().active == 0 and sup.stats().aborting == 0, timeout=20)
        assert sup.stats().restarts == 0
        assert isinstance(await sup.submit(items("after")[0]), Completion)


async def test_submitted_request_fails_after_its_runtime_is_replaced(harness: Harness) -> None:
    """A runtime killed under a submitted request: the request is handed back (retryable)
    only once a fresh runtime has replaced the dead one, as with `generate`."""
    async with harness.supervisor(engine_args={"token_delay_ms": 5}) as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        assert ident is not None
        sink = Sink()
        answer = sup.submit(streaming("k"), sink)
        await sink.first.wait()
        await asyncio.to_thread(harness.kill_runtime, ident)
        with pytest.raises(RuntimeEnded) as failed:
            await answer
        assert failed.value.retryable and "job k" in str(failed.value)
        harness.remember(sup)
        assert sup.stats().runtime_id not in (None, ident) and sup.stats().restarts == 1
        assert sup.stats().active == 0
        assert isinstance(await sup.submit(items("after")[0]), Completion)


async def test_death_while_idle_is_noticed(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        assert ident is not None
        await asyncio.to_thread(harness.kill_runtime, ident)
        await wait_for(lambda: sup.stats().runtime_id not in (None, ident), timeout=20)
        harness.remember(sup)
        assert [type(o) for o in await sup.run(items("x"))] == [Completion]


async def test_many_concurrent_requests(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        work = [
            WorkItem(f"j{i}", {"prompt": f"p{i}", "params": {"max_tokens": 1 + i % 7}})
            for i in range(64)
        ]
        out = await sup.run(work)
        assert [o.job_id for o in out if isinstance(o, Completion)] == [w.job_id for w in work]
        assert [len(o.token_ids) for o in out if isinstance(o, Completion)] == [
            1 + i % 7 for i in range(64)
        ]


async def test_replace_and_close(harness: Harness) -> None:
    sup = harness.supervisor()
    async with sup:
        harness.remember(sup)
        old = sup.stats().runtime_id
        facts = await sup.replace(harness.spec(token_delay_ms=1))
        harness.remember(sup)
        assert facts.engine == "echo"
        assert sup.stats().runtime_id != old
        assert [type(o) for o in await sup.run(items("x"))] == [Completion]
    await sup.aclose()
    assert sup.state is ResourceState.CLOSED
    with pytest.raises(RuntimeClosed):
        await sup.generate(items("x")[0])
    with pytest.raises(NodeError):
        async with sup:
            pass


async def test_close_hands_back_request_in_flight(harness: Harness) -> None:
    sup = harness.supervisor(engine_args={"token_delay_ms": 5})
    sink = Sink()
    async with sup:
        harness.remember(sup)
        task = asyncio.ensure_future(sup.generate(streaming("slow"), sink))
        await sink.first.wait()
    with pytest.raises(RuntimeClosed):
        await task
