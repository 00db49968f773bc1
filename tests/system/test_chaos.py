"""Chaos: a 3-server NATS cluster (R3 file streams), three agents in subprocesses with
Docker runtimes and a loadout of two models (every agent starts on the first; the second
is served only through on-demand switches), a steady job load for both, and repeated
faults: SIGKILL of agents, SIGKILL of
runtime containers, SIGKILL and restart of one NATS server at a time, SIGSTOP/SIGCONT of an
agent past the ack wait. Every published job must end with exactly one verified result or
one terminal error event; nothing lost, nothing duplicated, no runtime container left.
"""

import asyncio
import json
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import api

from schemas.envelope import EnvelopeType
from tests.support.chaoskit import (
    AgentProc,
    Cluster,
    LoadPublisher,
    agent_env,
    collect,
    judge,
    put_blob_model,
    runtime_containers_of,
)
from tests.support.edges import unavailable
from tests.support.polling import wait_for
from worker.core.roles import Role
from worker.core.settings import Settings
from worker.core.signing import NodeKey, write_key_file
from worker.devtools.devauth import ensure_dev_credentials
from worker.devtools.devnet import DevPlan, admit_node, seed_network
from worker.devtools.natsd import find_binary
from worker.jobs.provision import provision
from worker.node.snapshots import config_bucket, publish_snapshot

pytestmark = [pytest.mark.chaos, pytest.mark.nats, pytest.mark.docker]

AGENTS = 3
TARGETS = {"agent_kill": 20, "runtime_kill": 10, "nats_kill": 5, "agent_stop": 3}
PERIOD_S = {"agent_kill": 4.0, "runtime_kill": 7.0, "nats_kill": 14.0, "agent_stop": 15.0}
RATE = 20.0  # jobs per second, both models together
MAX_JOBS = 6000
SECOND = "echo-second"
"""The loadout's second model: no agent starts on it, so its jobs need switches."""
ACK_WAIT_S = 4.0
CHAOS_LIMIT_S = 240.0
SETTLE_LIMIT_S = 180.0
SEED = 7


def chaos_settings(tmp_path: Path, urls: list[str], authority: NodeKey) -> Settings:
    write_key_file(tmp_path / "seeder.key")
    return Settings(
        nats_url=",".join(urls),
        key_file=tmp_path / "seeder.key",
        authority_keys=(authority.node_id,),
        cache_dir=tmp_path / "seed-cache",
        state_dir=tmp_path / "seed-state",
        runtime_backend="docker",
        stream_replicas=3,
        ack_wait_s=ACK_WAIT_S,
        max_deliver=100,
        duplicate_window_s=900,
        shutdown_grace_s=5,
        max_in_flight=64,
        runtime_memory="256m",
        runtime_pids=64,
        runtime_shm="16m",
        runtime_stop_timeout_s=1,
        runtime_ready_timeout_s=60,
        request_timeout_s=20,
        heartbeat_interval_s=2,
        switch_min_residency_s=5,
        switch_check_interval_s=1,
        switch_grace_s=5,
    )


async def replicated_buckets(nc: Client, settings: Settings) -> None:
    """The config bucket and the model store on 3 replicas too (the seeder would make R1)."""
    js = nc.jetstream()
    await js.create_key_value(
        api.KeyValueConfig(bucket=config_bucket(settings), history=5, replicas=3)
    )
    await js.create_object_store(settings.models_bucket, api.ObjectStoreConfig(replicas=3))


async def node_state(nc: Client, settings: Settings, node_id: str) -> str | None:
    try:
        reply = await nc.request(settings.subject("nodes", node_id, "status"), b"", timeout=2)
    except Exception:
        return None
    state: str = msgpack.unpackb(reply.data).get("state")
    return state


async def wait_serving(nc: Client, settings: Settings, agents: list[AgentProc]) -> None:
    waiting = list(agents)

    async def all_serving() -> bool:
        nonlocal waiting
        waiting = [a for a in waiting if await node_state(nc, settings, a.node_id) != "serving"]
        for agent in waiting:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise AssertionError(f"{agent.name} exited at start:\n{agent.log_tail()}")
        return not waiting

    try:
        await wait_for(all_serving, timeout=120, interval=0.5)
    except TimeoutError:
        tails = "\n".join(f"{a.name}:\n{a.log_tail()}" for a in waiting)
        raise AssertionError(f"agents not serving after 120 s:\n{tails}") from None


class Chaos:
    """The fault injectors, each a loop with its own period, until its target is met."""

    def __init__(self, cluster: Cluster, agents: list[AgentProc], docker_client: Any) -> None:
        self.cluster = cluster
        self.agents = agents
        self.docker = docker_client
        self.rng = random.Random(SEED)
        self.counts: Counter[str] = Counter()
        self.crashes: list[str] = []
        self.done = asyncio.Event()

    def _pick(self) -> AgentProc | None:
        ready = [a for a in self.agents if a.alive and not a.lock.locked()]
        return self.rng.choice(ready) if ready else None

    async def _every(self, kind: str, action: Any) -> None:
        deadline = time.monotonic() + CHAOS_LIMIT_S
        while self.counts[kind] < TARGETS[kind] and time.monotonic() < deadline:
            await asyncio.sleep(PERIOD_S[kind] * self.rng.uniform(0.6, 1.4))
            if await action():
                self.counts[kind] += 1

    async def kill_agent(self) -> bool:
        agent = self._pick()
        if agent is None:
            return False
        async with agent.lock:
            killed = await asyncio.to_thread(agent.kill)
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
            agent.start()
        return killed

    async def kill_runtime(self) -> bool:
        agent = self._pick()
        if agent is None:
            return False

        def kill() -> bool:
            for container in runtime_containers_of(self.docker, [agent.node_id]):
                if container.status == "running":
                    try:
                        container.kill()
                        return True
                    except Exception:
                        return False
            return False

        return await asyncio.to_thread(kill)

    async def kill_nats(self) -> bool:
        server = self.cluster.servers[self.counts["nats_kill"] % len(self.cluster.servers)]
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(self.rng.uniform(1.0, 4.0))
        await asyncio.to_thread(server.start)
        await self.cluster.wait_jetstream()
        return True

    async def stop_agent(self) -> bool:
        agent = self._pick()
        if agent is None:
            return False
        async with agent.lock:
            if not agent.signal(signal.SIGSTOP):
                return False
            await asyncio.sleep(ACK_WAIT_S + 2.5)
            agent.signal(signal.SIGCONT)
        return True

    async def watch_crashes(self) -> None:
        """Agents that exit by themselves are restarted, and recorded."""
        while not self.done.is_set():
            await asyncio.sleep(0.5)
            for agent in self.agents:
                if agent.lock.locked():
                    continue
                code = agent.check_exit()
                if code is not None:
                    self.crashes.append(f"{agent.name} gen {agent.generation} exit {code}")
                    self.crashes.append(agent.log_tail(15))
                    agent.start()

    async def run(self) -> None:
        watcher = asyncio.create_task(self.watch_crashes())
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._every("agent_kill", self.kill_agent))
                tg.create_task(self._every("runtime_kill", self.kill_runtime))
                tg.create_task(self._every("nats_kill", self.kill_nats))
                tg.create_task(self._every("agent_stop", self.stop_agent))
        finally:
            self.done.set()
            await watcher


@pytest.mark.timeout(720)
async def test_chaos_exactly_one_outcome_per_job(
    tmp_path: Path, docker_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        find_binary()
    except FileNotFoundError as exc:
        unavailable(str(exc))
    started = time.monotonic()
    # NATS as `dev` runs it: TLS for clients and routes, a user per role; the harness reads
    # the streams as the authority and publishes jobs as a client, the agents are nodes.
    cluster = Cluster(tmp_path / "nats", ensure_dev_credentials(tmp_path / "credentials"))
    await asyncio.to_thread(cluster.start)
    agents: list[AgentProc] = []
    nc: Client | None = None
    client_nc: Client | None = None
    try:
        await cluster.wait_jetstream()
        authority = NodeKey.generate()
        settings = chaos_settings(tmp_path, cluster.urls, authority)
        nc = await cluster.connect(Role.AUTHORITY)
        client_nc = await cluster.connect(Role.CLIENT)
        await replicated_buckets(nc, settings)
        plan = DevPlan(tmp_path / "dev", 0, "echo", "docker", "hi")
        authority_settings = cluster.settings(settings, Role.AUTHORITY)
        snapshot = await seed_network(authority_settings, authority, plan, version=1)
        model = snapshot.models[0].id
        body = snapshot.model_dump(mode="json") | {"version": 2}
        body["models"].append(await put_blob_model(nc, settings, tmp_path, SECOND))
        # the authority provisions each model's job consumer (a node may not create one)
        await provision(nc.jetstream(), settings, [SECOND])
        envelope = authority.sign(EnvelopeType.CONFIG, body)
        await publish_snapshot(nc, config_bucket(settings), envelope)
        logs = tmp_path / "logs"
        logs.mkdir()
        for i in range(AGENTS):
            home = tmp_path / f"agent{i}"
            key = write_key_file(home / "node.key")
            await admit_node(authority_settings, authority, key.node_id)
            env = agent_env(settings, home, home / "node.key", cluster)
            agents.append(AgentProc(f"agent{i}", env, logs, key.node_id))
        for agent in agents:
            agent.start()
        await wait_serving(client_nc, settings, agents)
        ready_s = time.monotonic() - started

        publishers = [
            LoadPublisher(client_nc, settings, model, RATE / 2, MAX_JOBS // 2, prefix="chaos"),
            LoadPublisher(client_nc, settings, SECOND, RATE / 2, MAX_JOBS // 2, prefix="chaos2"),
        ]
        acked: list[str] = []
        unconfirmed: list[str] = []
        chaos = Chaos(cluster, agents, docker_client)
        loads = [asyncio.create_task(p.run()) for p in publishers]
        chaos_started = time.monotonic()
        try:
            await chaos.run()
        finally:
            for publisher in publishers:
                publisher.stop.set()
            await asyncio.gather(*loads)
            for publisher in publishers:
                acked += publisher.acked
                unconfirmed += publisher.unconfirmed
        chaos_s = time.monotonic() - chaos_started

        # Settle: every job acked or terminated (the work queue is empty) and every
        # published job has an outcome; bounded.
        settle_started = time.monotonic()
        js = nc.jetstream()
        while True:
            try:
                info = await js.stream_info(settings.stream("JOBS"))
            except nats.errors.TimeoutError:  # leader election after the last server kill
                if time.monotonic() - settle_started > SETTLE_LIMIT_S:
                    raise
                await asyncio.sleep(2)
                continue
            outcomes = await collect(nc, settings)
            verdict = judge(acked, outcomes)
            if info.state.messages == 0 and not verdict.lost:
                break
            if time.monotonic() - settle_started > SETTLE_LIMIT_S:
                break
            await asyncio.sleep(3)
        settle_s = time.monotonic() - settle_started
        queue_left = info.state.messages

        exits = {a.name: await asyncio.to_thread(a.terminate, 30) for a in agents}
        leftovers = await asyncio.to_thread(
            runtime_containers_of, docker_client, [a.node_id for a in agents]
        )
        outcomes = await collect(nc, settings)
        verdict = judge(acked, outcomes)
        report = {
            "jobs_published": len(acked),
            "publish_retries": sum(p.retries for p in publishers),
            "unconfirmed_publishes": len(unconfirmed),
            "results": sum(outcomes.results.values()),
            "results_stored": outcomes.stored_results,
            "results_by_node": dict(outcomes.result_signers),
            "results_by_model": dict(outcomes.result_models),
            "switches": sum(a.log_text().count("model_switch from=") for a in agents),
            "terminal_errors": sum(outcomes.terminal.values()),
            "retryable_error_events": outcomes.retryable,
            "bad_signatures": outcomes.bad_signatures,
            "lost": len(verdict.lost),
            "duplicated": len(verdict.duplicated),
            "result_and_terminal": len(verdict.both),
            "strangers": len(verdict.strangers),
            "queue_left": queue_left,
            "kills": dict(chaos.counts),
            "agent_crashes": len(chaos.crashes) // 2,
            "agent_exit_codes": exits,
            "leftover_containers": len(leftovers),
            "ready_s": round(ready_s, 1),
            "chaos_s": round(chaos_s, 1),
            "settle_s": round(settle_s, 1),
            "total_s": round(time.monotonic() - started, 1),
        }
        with capsys.disabled():
            print("\nchaos report: " + json.dumps(report, sort_keys=True))  # noqa: T201
        (tmp_path / "chaos-report.json").write_text(json.dumps(report, indent=2))

        assert not unconfirmed, unconfirmed[:10]
        assert verdict.lost == [], f"lost outcomes: {verdict.lost[:20]}"
        assert verdict.duplicated == [], f"duplicated outcomes: {verdict.duplicated[:20]}"
        assert verdict.both == [], f"result and terminal error: {verdict.both[:20]}"
        assert verdict.strangers == [], verdict.strangers[:20]
        assert outcomes.bad_signatures == 0
        assert outcomes.stored_results == sum(outcomes.results.values())
        assert set(outcomes.result_signers) <= {a.node_id for a in agents}
        assert queue_left == 0
        assert set(outcomes.result_models) == {model, SECOND}
        for kind, target in TARGETS.items():
            assert chaos.counts[kind] >= target, (kind, chaos.counts)
        assert chaos.crashes == [], "\n".join(chaos.crashes)
        assert all(code == 0 for code in exits.values()), exits
        assert leftovers == [], [c.name for c in leftovers]
    finally:
        for agent in agents:
            if agent.alive:
                await asyncio.to_thread(agent.terminate, 10)
        for container in await asyncio.to_thread(
            runtime_containers_of, docker_client, [a.node_id for a in agents]
        ):
            await asyncio.to_thread(container.remove, force=True)
        for connection in (nc, client_nc):
            if connection is not None:
                await connection.close()
        await asyncio.to_thread(cluster.stop)
