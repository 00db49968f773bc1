"""What a node does when a snapshot changes (issue 25), against a real nats-server and the
echo engine in a local process: apply in place when nothing it runs changes, switch without
cutting work when something does, stop a revoked model at once."""

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client

from schemas.envelope import EnvelopeType
from schemas.node import NodeState
from schemas.result import ResultBody
from schemas.snapshot import Snapshot
from tests.support.agent import running, serving
from tests.support.jobnet import errors, results
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.models.objectstore import put_file
from worker.node.agent import Agent
from worker.node.snapshots import config_bucket, publish_snapshot

pytestmark = pytest.mark.nats

SLOW_MS = 500
"""Echo's delay per token: a job of 16 tokens runs 8 s, far longer than any apply here."""


@pytest.fixture
def authority() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, authority: NodeKey) -> Settings:
    return make_settings(
        tmp_path,
        nats_url=nats_server.url,
        authority_keys=(authority.node_id,),
        runtime_backend="process",
        ack_wait_s=60,
        shutdown_grace_s=0,
        switch_grace_s=120,
    )


async def slow_network(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> dict[str, Any]:
    """Version 2 of the demo network, its echo engine slowed down; returns its body."""
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot: Snapshot = await seed_network(settings, authority, plan, version=1)
    body = snapshot.model_dump(mode="json") | {"version": 2}
    body["runtime"]["engine_args"] = {"token_delay_ms": SLOW_MS}
    await publish(nc, settings, authority, body)
    return body


async def publish(nc: Client, settings: Settings, authority: NodeKey, body: dict[str, Any]) -> None:
    envelope = authority.sign(EnvelopeType.CONFIG, body)
    await publish_snapshot(nc, config_bucket(settings), envelope)


async def put_model(nc: Client, settings: Settings, tmp_path: Path, name: str) -> dict[str, Any]:
    """Another model in the object store; its spec for a snapshot."""
    data = f"model {name} ".encode() * 1000
    path = tmp_path / f"{name}.bin"
    path.write_bytes(data)
    await put_file(nc.jetstream(), settings.models_bucket, name, path)
    return {
        "id": name,
        "version": "1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": f"nats-object://{settings.models_bucket}/{name}",
        "validation": [],
    }


async def start_job(nc: Client, settings: Settings, agent: Agent, model: str, job_id: str) -> None:
    """Publish a 16-token job and return once the agent holds it."""
    body = {"job_id": job_id, "model_id": model, "prompt": "x", "params": {"max_tokens": 16}}
    await nc.jetstream().publish(
        settings.subject("jobs", model), msgpack.packb(body), headers={"Nats-Msg-Id": job_id}
    )
    await wait_for(lambda: agent.pipeline is not None and agent.pipeline.in_flight == 1, 30)


async def result_of(nc: Client, settings: Settings, job_id: str) -> ResultBody:
    found: list[ResultBody] = []

    async def done() -> bool:
        found[:] = [r for r in await results(nc.jetstream(), settings) if r.job_id == job_id]
        return bool(found)

    await wait_for(done, 60)
    return found[0]


def runtime_id(agent: Agent) -> Any:
    return agent.status().runtime["runtime_id"]


async def test_a_snapshot_that_changes_nothing_this_node_runs_cuts_no_job(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """Another model added to the approved list: the new snapshot is in force at once, the
    runtime keeps running (same id) and the job in flight ends as attempt 1."""
    body = await slow_network(settings, authority, tmp_path, nc)
    model = body["models"][0]["id"]
    async with running(settings) as agent:
        await serving(agent, config_version=2)
        before = runtime_id(agent)
        await start_job(nc, settings, agent, model, "kept")
        body3 = body | {"version": 3, "models": [*body["models"], await put_model(
            nc, settings, tmp_path, "unrelated"
        )]}  # fmt: skip
        await publish(nc, settings, authority, body3)
        await serving(agent, config_version=3)
        assert agent.pipeline is not None and agent.pipeline.in_flight == 1, "the job was cut"
        assert runtime_id(agent) == before
        done = await result_of(nc, settings, "kept")
    assert done.attempt == 1 and done.config_version == 3
    assert await errors(nc.jetstream(), settings) == []


async def test_a_switch_lets_a_job_shorter_than_the_grace_finish_on_the_old_runtime(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """The engine's arguments change (a new runtime is due): the node stops pulling, the
    job in flight finishes on the old runtime (attempt 1, under the old snapshot), and
    only then does the new runtime start."""
    body = await slow_network(settings, authority, tmp_path, nc)
    model = body["models"][0]["id"]
    async with running(settings) as agent:
        await serving(agent, config_version=2)
        before = runtime_id(agent)
        await start_job(nc, settings, agent, model, "finishes")
        old = agent.pipeline
        assert old is not None
        body3 = body | {"version": 3, "runtime": body["runtime"] | {"engine_args": {}}}
        await publish(nc, settings, authority, body3)
        await agent.wait_until(lambda: agent.node_state is NodeState.APPLYING)
        assert old.in_flight == 1, "the switch began with the job in flight"
        await serving(agent, config_version=3)
        assert runtime_id(agent) != before
        done = await result_of(nc, settings, "finishes")
    assert done.attempt == 1 and done.config_version == 2
    assert await errors(nc.jetstream(), settings) == []


async def test_a_revoked_model_stops_at_once(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """A snapshot that no longer approves the model in service gives its jobs no grace:
    the job in flight is handed back (no result, no error event) long before it could
    have finished, and the successor serves."""
    body = await slow_network(settings, authority, tmp_path, nc)
    model = body["models"][0]["id"]
    async with running(settings) as agent:
        await serving(agent, config_version=2)
        await start_job(nc, settings, agent, model, "revoked")
        old = agent.pipeline
        assert old is not None
        body3 = body | {"version": 3, "models": [await put_model(nc, settings, tmp_path, "next")]}
        body3["runtime"] = body["runtime"] | {"engine_args": {}}
        await publish(nc, settings, authority, body3)
        # Closed without the grace: a job that had finished would have published first.
        await wait_for(lambda: not old.is_open, 30)
        js = nc.jetstream()
        assert [r for r in await results(js, settings) if r.job_id == "revoked"] == []
        await serving(agent, config_version=3)
    assert await errors(nc.jetstream(), settings) == []


async def test_a_failed_model_is_quarantined_then_retried_and_serves_once_it_verifies(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """Every model has a state in `status()` and a lifecycle event per change: the new
    model's bytes fail their hash (failed, with the reason), the old one is removed; the
    apply is retried with backoff and, once the source holds the right bytes, the model
    is active."""
    from schemas.codec import validate
    from schemas.event import LifecycleEvent
    from tests.support.jobnet import read_all
    from worker.core.signing import verify

    settings = settings.model_copy(update={"apply_retry_s": 0.2})
    body = await slow_network(settings, authority, tmp_path, nc)
    old = body["models"][0]["id"]
    spec = await put_model(nc, settings, tmp_path, "second")
    await put_file_bytes(nc, settings, tmp_path, "second", b"t" * spec["size"])
    async with running(settings) as agent:
        await serving(agent, config_version=2)
        assert [(m.id, m.state) for m in agent.status().models] == [(old, "active")]
        await publish(nc, settings, authority, body | {"version": 3, "models": [spec]})

        def state_of(model_id: str) -> tuple[str, str | None] | None:
            found = [m for m in agent.status().models if m.id == model_id]
            return (found[0].state.value, found[0].reason) if found else None

        await wait_for(lambda: (state_of("second") or ("", None))[0] == "failed", 30)
        state, reason = state_of("second") or ("", None)
        assert reason is not None and "SHA-256" in reason
        assert state_of(old) == ("removed", "not approved by snapshot 3")
        await put_model(nc, settings, tmp_path, "second")
        await serving(agent, config_version=3)
        assert state_of("second") == ("active", None)
        assert state_of(old) is None
    stored = await read_all(
        nc.jetstream(), settings.stream("EVENTS"), settings.subject("events", "node", ">")
    )
    events = [validate(LifecycleEvent, verify(d).body) for d in stored]
    second = [
        e.details["state"]
        for e in events
        if e.kind == "model_state" and e.details["id"] == "second"
    ]
    assert second[0] == "pending" and "failed" in second
    assert second[-2:] == ["ready", "active"]


async def put_file_bytes(
    nc: Client, settings: Settings, tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / f"{name}.bad"
    path.write_bytes(data)
    await put_file(nc.jetstream(), settings.models_bucket, name, path)


async def test_two_models_with_alternating_bursts_are_both_served_with_few_switches(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """One node, two approved models, one runtime at a time: each burst of jobs for the
    model not loaded waits in its queue (this node does not pull it) until the loaded one
    is idle, then the node switches to it. Four bursts: at most one switch per burst."""
    settings = settings.model_copy(
        update={"switch_min_residency_s": 0.5, "switch_check_interval_s": 0.2}
    )
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot: Snapshot = await seed_network(settings, authority, plan, version=1)
    first = snapshot.models[0].id
    body = snapshot.model_dump(mode="json") | {"version": 2}
    body["models"].append(await put_model(nc, settings, tmp_path, "second"))
    await publish(nc, settings, authority, body)
    js = nc.jetstream()
    async with running(settings) as agent:
        await serving(agent, config_version=2)
        # the other model of the loadout is prefetched while the first one serves
        loadout = [(first, "active"), ("second", "ready")]
        await wait_for(
            lambda: [(m.id, m.state.value) for m in agent.status().models] == loadout, 30
        )
        for burst, model in enumerate([first, "second", first, "second"]):
            ids = [f"burst{burst}-{i}" for i in range(10)]
            for job_id in ids:
                job = {"job_id": job_id, "model_id": model, "prompt": job_id}
                await js.publish(
                    settings.subject("jobs", model),
                    msgpack.packb(job),
                    headers={"Nats-Msg-Id": job_id},
                )

            async def burst_done(ids: list[str] = ids) -> bool:
                return set(ids) <= {r.job_id for r in await results(js, settings)}

            await wait_for(burst_done, 60)
            served = {r.model.id for r in await results(js, settings) if r.job_id in ids}
            assert served == {model}
        switches = agent.switches
        states = {m.id: m.state.value for m in agent.status().models}
        counted = {model: f.switches for model, f in agent.metrics.models.items() if f.switches}
        downtimes = sum(f.switch_downtime.count for f in agent.metrics.models.values())
    assert 1 <= switches <= 3
    assert sum(counted.values()) == switches == downtimes, (counted, switches)
    assert set(counted) <= {first, "second"}
    assert states == {first: "ready", "second": "active"}
    assert await errors(js, settings) == []


async def test_two_nodes_with_the_same_two_models_end_up_serving_both(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """Two nodes, the same loadout of two models, both start on the first one; a backlog
    for each model. Both see the second model starved from the same consumer info, but
    only the node that claims it switches (the other's claim is refused while the switch
    runs): the moment that node serves the second model, the other one still serves the
    first. Every job is answered once, each model by the node serving it."""
    update = {"switch_min_residency_s": 0.5, "switch_check_interval_s": 0.2}
    nodes = [
        make_settings(
            tmp_path / name,
            **settings.model_dump(exclude={"key_file", "cache_dir", "state_dir"}) | update,
        )
        for name in ("one", "two")
    ]
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot: Snapshot = await seed_network(settings, authority, plan, version=1)
    first = snapshot.models[0].id
    body = snapshot.model_dump(mode="json") | {"version": 2}
    body["runtime"]["engine_args"] = {"token_delay_ms": 50}
    body["models"].append(await put_model(nc, settings, tmp_path, "second"))
    await publish(nc, settings, authority, body)
    js = nc.jetstream()
    async with running(nodes[0]) as one, running(nodes[1]) as two:
        agents = [one, two]
        for agent in agents:
            await serving(agent, config_version=2)
            await wait_for(
                lambda agent=agent: (
                    {m.state.value for m in agent.status().models} == {"active", "ready"}
                ),
                30,
            )
        assert {a.model.id for a in agents if a.model} == {first}
        ids = {model: [f"{model}-{i}" for i in range(30)] for model in (first, "second")}
        for model, job_ids in ids.items():
            for job_id in job_ids:
                job = {"job_id": job_id, "model_id": model, "prompt": "x", "params": {
                    "max_tokens": 8
                }}  # fmt: skip
                await js.publish(
                    settings.subject("jobs", model),
                    msgpack.packb(job),
                    headers={"Nats-Msg-Id": job_id},
                )

        def both_served() -> bool:
            served = {
                a.model.id
                for a in agents
                if a.node_state is NodeState.SERVING and a.model is not None
            }
            return served == {first, "second"}

        # Checked at every change of either node's state.
        waits = [asyncio.ensure_future(a.wait_until(both_served)) for a in agents]
        try:
            await asyncio.wait_for(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), 120)
        finally:
            for w in waits:
                w.cancel()
        assert both_served()

        everything = {job_id for job_ids in ids.values() for job_id in job_ids}

        async def all_done() -> bool:
            return everything <= {r.job_id for r in await results(js, settings)}

        await wait_for(all_done, 120)
        done = [r for r in await results(js, settings) if r.job_id in everything]
    assert sorted(r.job_id for r in done) == sorted(everything), "a job answered twice"
    assert {r.model.id for r in done if r.job_id in ids["second"]} == {"second"}
    assert await errors(js, settings) == []


async def test_waiting_for_a_snapshot_applied_in_place_returns(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    """A snapshot that approves another model, outside this node's loadout: applied in
    place with no model state changing here, and `wait_serving` for its version returns
    (it hung: nothing woke the waiters after the pipeline's version moved)."""
    body = await slow_network(settings, authority, tmp_path, nc)
    model = body["models"][0]["id"]
    async with running(settings.model_copy(update={"models": (model,)})) as agent:
        await serving(agent, config_version=2)
        before = runtime_id(agent)
        spec = await put_model(nc, settings, tmp_path, "elsewhere")
        await publish(
            nc, settings, authority, body | {"version": 3, "models": [*body["models"], spec]}
        )
        await serving(agent, config_version=3, timeout=30)
        assert runtime_id(agent) == before
