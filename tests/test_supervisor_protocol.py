"""The supervisor against real runtimes: the echo engine (with its fault injection) and
`tests/fake_runtime.py`, through both backends: Docker containers and local processes."""

import asyncio
import dataclasses
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fake_runtime_image import FAKE_COMMAND, echo_image, ensure_test_image
from worker.core.errors import (
    ItemFailed,
    NodeError,
    RuntimeBroken,
    RuntimeClosed,
    RuntimeEnded,
    RuntimeFailure,
    RuntimeStartError,
    RuntimeTimeout,
)
from worker.core.settings import Settings
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.container import LABEL_NODE, DockerBackend
from worker.runtime.process import ProcessBackend
from worker.runtime.supervisor import Supervisor, SupervisorState
from worker.runtime.transport import Backend

ROOT = Path(__file__).resolve().parent.parent
NODE_ID = secrets.token_hex(32)  # per run: containers of other test runs are not ours
MODEL_SHA = "cd" * 32
FAKE_LOCAL = ["python3", str(ROOT / "tests" / "fake_runtime.py")]

BackendFactory = Callable[..., Backend]


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "runtime_ready_timeout_s": 15.0,
        "request_timeout_s": 3.0,
        "ping_interval_s": 1.0,
        "ping_timeout_s": 3.0,
        "runtime_stop_timeout_s": 1.0,
        "runtime_max_frame_bytes": 1 << 20,
        "runtime_memory": "256m",
        "runtime_pids": 64,
        "runtime_shm": "16m",
    }
    values.update(overrides)
    return Settings(**values)


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
        self, *, fake: str | None = None, env: dict[str, str] | None = None, **settings: Any
    ) -> Supervisor:
        config = make_settings(**settings)
        spec = self.spec()
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


def items(*prompts: str) -> list[WorkItem]:
    return [
        WorkItem(job_id=f"job-{i}", payload={"prompt": p, "params": {"max_tokens": 4, "seed": i}})
        for i, p in enumerate(prompts)
    ]


def assert_all(outcomes: list[Any], kind: type[NodeError]) -> None:
    assert outcomes and all(isinstance(o, kind) and o.retryable for o in outcomes), outcomes


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


async def test_batch_round_trip(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        out = await sup.run(items("hello", "world", "again"))
        assert [type(o) for o in out] == [Completion] * 3
        assert [o.job_id for o in out if isinstance(o, Completion)] == ["job-0", "job-1", "job-2"]
        assert sup.facts.engine == "echo" and sup.facts.model_sha256 == MODEL_SHA
        assert sup.facts.image == harness.image
        assert sup.facts.engine_version and sup.facts.device
        again = await sup.run(items("hello"))
        assert again[0] == out[0]
        stats = sup.stats()
        assert stats.batches == 2 and stats.restarts == 0 and stats.runtime_id
        assert await sup.run([]) == []


async def test_item_error_fails_only_that_job(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        out = await sup.run(items("fine", "!fault:error", "fine too"))
        assert isinstance(out[0], Completion) and isinstance(out[2], Completion)
        assert isinstance(out[1], ItemFailed) and not out[1].retryable
        assert sup.stats().restarts == 0


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("crash", RuntimeEnded),
        ("hang", RuntimeTimeout),
        ("garbage", RuntimeBroken),
        ("oversize", RuntimeBroken),
    ],
)
async def test_fault_replaces_runtime(
    harness: Harness, fault: str, error: type[RuntimeFailure]
) -> None:
    async with harness.supervisor(request_timeout_s=1.5) as sup:
        harness.remember(sup)
        first = sup.stats().runtime_id
        out = await sup.run(items("a", f"!fault:{fault}", "b"))
        assert_all(out, error)
        harness.remember(sup)
        assert sup.stats().runtime_id not in (None, first)
        assert sup.stats().restarts == 1
        assert [type(o) for o in await sup.run(items("after"))] == [Completion]


async def test_fatal_frame_replaces_runtime(harness: Harness) -> None:
    async with harness.supervisor(fake="fatal") as sup:
        harness.remember(sup)
        out = await sup.run(items("x", "y"))
        assert_all(out, RuntimeEnded)
        assert "fatal" in str(out[0])
        harness.remember(sup)
        assert sup.stats().restarts == 1


async def test_never_ready_fails_start_with_advice(harness: Harness) -> None:
    sup = harness.supervisor(env={"RESULTITY_ECHO_FAULT": "noready"}, runtime_ready_timeout_s=1.0)
    with pytest.raises(RuntimeStartError, match="RESULTITY_RUNTIME_READY_TIMEOUT_S"):
        async with sup:
            pass
    assert sup.state is SupervisorState.CLOSED


async def test_protocol_version_mismatch(harness: Harness) -> None:
    with pytest.raises(RuntimeStartError, match="protocol 99"):
        async with harness.supervisor(fake="badproto"):
            pass


async def test_poison_job_isolated(harness: Harness) -> None:
    batch = items("a", "b", "c", "!fault:crash", "e", "f")
    async with harness.supervisor() as sup:
        harness.remember(sup)
        first = await sup.run(batch)
        assert_all(first, RuntimeEnded)
        second = await sup.run(batch)
        harness.remember(sup)
        poison = second[3]
        assert isinstance(poison, ItemFailed) and not poison.retryable
        assert "killed the runtime" in str(poison)
        others = second[:3] + second[4:]
        assert [type(o) for o in others] == [Completion] * 5
        assert [o.job_id for o in others if isinstance(o, Completion)] == [
            "job-0",
            "job-1",
            "job-2",
            "job-4",
            "job-5",
        ]
        assert [type(o) for o in await sup.run(items("later"))] == [Completion]


async def test_killed_mid_batch(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        assert ident is not None
        await sup.replace(harness.spec(slow_ms=1500))
        ident = sup.stats().runtime_id
        assert ident is not None
        harness.remember(sup)
        batch = asyncio.ensure_future(sup.run(items("slow", "batch")))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(harness.kill_runtime, ident)
        out = await batch
        assert_all(out, RuntimeEnded)
        harness.remember(sup)
        assert sup.stats().runtime_id != ident


async def test_death_while_idle_is_noticed(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        ident = sup.stats().runtime_id
        assert ident is not None
        await asyncio.to_thread(harness.kill_runtime, ident)
        await wait_for(lambda: sup.stats().runtime_id not in (None, ident), "a fresh runtime")
        harness.remember(sup)
        assert [type(o) for o in await sup.run(items("x"))] == [Completion]


async def test_concurrent_runs_are_serialized(harness: Harness) -> None:
    async with harness.supervisor() as sup:
        harness.remember(sup)
        batches = [
            [WorkItem(job_id=f"j{b}-{i}", payload={"prompt": f"p{b}{i}"}) for i in range(4)]
            for b in range(8)
        ]
        results = await asyncio.gather(*(sup.run(b) for b in batches))
        for batch, out in zip(batches, results, strict=True):
            assert [o.job_id for o in out if isinstance(o, Completion)] == [i.job_id for i in batch]


async def test_replace_and_close(harness: Harness) -> None:
    sup = harness.supervisor()
    async with sup:
        harness.remember(sup)
        old = sup.stats().runtime_id
        facts = await sup.replace(harness.spec(slow_ms=1))
        harness.remember(sup)
        assert facts.engine == "echo"
        assert sup.stats().runtime_id != old
        assert [type(o) for o in await sup.run(items("x"))] == [Completion]
    await sup.aclose()
    assert sup.state is SupervisorState.CLOSED
    with pytest.raises(RuntimeClosed):
        await sup.run(items("x"))
    with pytest.raises(RuntimeClosed):
        async with sup:
            pass


async def test_close_hands_back_batch_in_flight(harness: Harness) -> None:
    sup = harness.supervisor()
    async with sup:
        harness.remember(sup)
        await sup.replace(harness.spec(slow_ms=3000))
        harness.remember(sup)
        batch = asyncio.ensure_future(sup.run(items("slow")))
        await asyncio.sleep(0.3)
    out = await batch
    assert_all(out, RuntimeClosed)
