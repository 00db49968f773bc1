"""The agent as the process an operator runs: SIGKILL mid-run, SIGTERM mid-run.

Every valid job must end with exactly one result in the stream (redelivery plus the
stream's dedupe), none lost; a SIGTERM mid-run finishes the jobs in flight, hands back
the rest and leaves no runtime.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import msgpack
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.result import ResultBody
from schemas.snapshot import Snapshot
from schemas.stream import StreamBody
from tests.support.jobnet import read_all, results
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.node.snapshots import config_bucket, publish_snapshot
from worker.runtime.container import runtime_containers

pytestmark = pytest.mark.nats


def agent_env(settings: Settings, authority: NodeKey) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESULTITY_")}
    env.update(
        RESULTITY_NATS_URL=settings.nats_url,
        RESULTITY_NATS_INSECURE="1",
        RESULTITY_ADMISSION_REQUIRED="0",
        RESULTITY_KEY_FILE=str(settings.key_file),
        RESULTITY_AUTHORITY_KEYS=authority.node_id,
        RESULTITY_CACHE_DIR=str(settings.cache_dir),
        RESULTITY_STATE_DIR=str(settings.state_dir),
        RESULTITY_RUNTIME_BACKEND=settings.runtime_backend,
        RESULTITY_ACK_WAIT_S=str(settings.ack_wait_s),
        RESULTITY_MAX_DELIVER="20",
        RESULTITY_SHUTDOWN_GRACE_S=str(settings.shutdown_grace_s),
        RESULTITY_RUNTIME_MEMORY="1g",
    )
    return env


def start_agent(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", "run"], env=env, stdout=out, stderr=out
        )


async def slow_snapshot(
    nc: Client, settings: Settings, authority: NodeKey, snapshot: Snapshot, token_delay_ms: int
) -> None:
    body = snapshot.model_dump(mode="json")
    body["version"] = snapshot.version + 1
    body["runtime"]["engine_args"] = {"token_delay_ms": token_delay_ms}
    await publish_snapshot(nc, config_bucket(settings), authority.sign(EnvelopeType.CONFIG, body))


async def publish(
    nc: Client, settings: Settings, model: str, n: int, prefix: str, *, stream: bool = False
) -> list[str]:
    """`n` jobs; with `stream`, every other one streams its output."""
    js = nc.jetstream()
    ids = [f"{prefix}-{i}" for i in range(n)]
    for i, job_id in enumerate(ids):
        body = {"job_id": job_id, "model_id": model, "prompt": job_id}
        if stream and i % 2 == 0:
            body["stream"] = True
        data = msgpack.packb(body)
        await js.publish(settings.subject("jobs", model), data, headers={"Nats-Msg-Id": job_id})
    return ids


async def test_sigkill_mid_run_loses_and_duplicates_nothing(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    authority = NodeKey.generate()
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        runtime_backend="process",
        ack_wait_s=2.0,
        shutdown_grace_s=5,
    )
    snapshot = await seed_network(
        settings, authority, DevPlan(tmp_path / "dev", 0, "echo", "process", "x"), version=1
    )
    await slow_snapshot(nc, settings, authority, snapshot, token_delay_ms=6)
    model = snapshot.models[0].id
    streamed: dict[tuple[str, int], list[StreamBody]] = defaultdict(list)

    async def on_stream(msg: Msg) -> None:
        body = validate(StreamBody, verify(msg.data, expect=EnvelopeType.STREAM).body)
        streamed[(body.job_id, body.attempt)].append(body)

    await nc.subscribe(settings.subject("stream", ">"), cb=on_stream)
    ids = await publish(nc, settings, model, 300, "k", stream=True)
    env = agent_env(settings, authority)
    env["RESULTITY_RUNTIME_MAX_ACTIVE"] = "4"  # ~40 jobs/s: the kills land mid-run
    log = tmp_path / "agent.log"
    js = nc.jetstream()
    kills = 0
    proc = start_agent(env, log)
    try:
        for _ in range(4):
            before = len(await results(js, settings))

            async def progressed(before: int = before) -> bool:
                return len(await results(js, settings)) > before + 20

            await wait_for(progressed, timeout=90, interval=0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start_agent(env, log)

        async def all_done() -> bool:
            return len({r.job_id for r in await results(js, settings)}) == len(ids)

        await wait_for(all_done, timeout=180, interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    stored = await read_all(js, settings.stream("RESULTS"), settings.subject("results", ">"))
    per_job = Counter(verify(d, expect=EnvelopeType.RESULT).body["job_id"] for d in stored)
    assert kills == 4
    assert set(per_job) == set(ids), "every job has a result"
    assert max(per_job.values()) == 1, "no job has two results in the stream"
    # streaming jobs: the attempt that produced the result streamed exactly its tokens
    for data in stored:
        result = validate(ResultBody, verify(data).body)
        if int(result.job_id.split("-")[1]) % 2:
            continue
        parts = sorted(streamed[(result.job_id, result.attempt)], key=lambda b: b.seq)
        assert [b.seq for b in parts] == list(range(len(parts))), result.job_id
        assert [t for b in parts for t in b.token_ids] == result.output.token_ids
        assert parts[-1].finish_reason == result.output.finish_reason
    assert (await js.stream_info(settings.stream("JOBS"))).state.messages == 0


async def test_sigterm_mid_run_finishes_jobs_in_flight_and_hands_back_the_rest(
    docker_client: object, nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    authority = NodeKey.generate()
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        runtime_backend="docker",
        ack_wait_s=30.0,
        shutdown_grace_s=3,
    )
    snapshot = await seed_network(
        settings, authority, DevPlan(tmp_path / "dev", 0, "echo", "docker", "x"), version=1
    )
    await slow_snapshot(nc, settings, authority, snapshot, token_delay_ms=100)
    model = snapshot.models[0].id
    env = agent_env(settings, authority)
    env["RESULTITY_RUNTIME_MAX_ACTIVE"] = "4"
    log = tmp_path / "agent.log"
    proc = start_agent(env, log)
    js = nc.jetstream()
    try:
        # wait until it serves (the first job of the slow runtime comes back)
        await publish(nc, settings, model, 1, "warm")

        async def warmed() -> bool:
            return len(await results(js, settings)) == 1

        await wait_for(warmed, timeout=120, interval=0.2)
        ids = await publish(nc, settings, model, 20, "t")

        async def holds_jobs() -> bool:
            # Pulled and not yet acked: the slow runtime runs jobs of the agent now.
            info = await js.consumer_info(settings.stream("JOBS"), f"rst-jobs-{model}")
            return info.num_ack_pending > 0

        await wait_for(holds_jobs, timeout=60)
        proc.send_signal(signal.SIGTERM)
        # How long the drain takes is measured in bench/, not asserted here.
        code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log.read_text()[-3000:]
    done = {r.job_id for r in await results(js, settings)} - {"warm-0"}
    info = await js.consumer_info(settings.stream("JOBS"), f"rst-jobs-{model}")
    handed_back = info.num_pending + info.num_ack_pending + info.num_redelivered
    assert done, "jobs in flight finished inside the grace period"
    assert len(done) + info.num_pending + info.num_ack_pending >= len(ids), (done, handed_back)
    leftovers = await asyncio.to_thread(runtime_containers, docker_client, verify_node(settings))
    assert leftovers == []


def verify_node(settings: Settings) -> str:
    from worker.core.signing import load_key_file

    return load_key_file(settings.key_file).node_id


async def test_runtime_left_by_a_killed_agent_is_removed_at_the_next_start(
    docker_client: object, nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    authority = NodeKey.generate()
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        runtime_backend="docker",
        ack_wait_s=10.0,
        shutdown_grace_s=3,
    )
    await seed_network(
        settings, authority, DevPlan(tmp_path / "dev", 0, "echo", "docker", "x"), version=1
    )
    node_id = verify_node(settings)

    def runtimes() -> list[object]:
        return runtime_containers(docker_client, node_id)

    env = agent_env(settings, authority)
    log = tmp_path / "agent.log"
    proc = start_agent(env, log)
    try:

        async def has_runtime() -> bool:
            return bool(await asyncio.to_thread(runtimes))

        await wait_for(has_runtime, timeout=120, interval=0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert await asyncio.to_thread(runtimes), "SIGKILL leaves the runtime behind"
        # The next agent cannot even reach NATS, and is stopped before it serves: the
        # leftover must still go, at its start.
        env["RESULTITY_NATS_URL"] = "nats://127.0.0.1:1"
        proc = start_agent(env, log)

        async def no_runtime() -> bool:
            return not await asyncio.to_thread(runtimes)

        await wait_for(no_runtime, timeout=60, interval=0.5)
    finally:
        proc.kill()
        proc.wait(10)
