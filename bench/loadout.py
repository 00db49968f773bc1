"""The loadout (issue 25): what a switch between two models costs, what a snapshot that
does not touch the loaded model cuts, and two models' traffic on two nodes with a loadout
each against two nodes pinned to one model each. Agents run in this process, on one NATS
server, the echo engine in the runtime backend given (`docker` for figures, `process` for
a smoke test).

    python -m bench.loadout --backend docker --switches 10 --reps 5
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.common import alternated, connected, embedded_nats, percentile, record, summary
from schemas.codec import validate
from schemas.envelope import EnvelopeType
from schemas.result import ResultBody
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify, write_key_file
from worker.devtools.devnet import DevPlan, seed_network
from worker.models.objectstore import put_file
from worker.node.agent import Agent
from worker.node.snapshots import config_bucket, publish_snapshot

TOKEN_DELAY_MS = 20
"""Echo's delay per token: a job's run time is its max_tokens times this."""
SECOND = "echo-second"


@dataclass
class Net:
    """One NATS server, the authority, the snapshot body in force and the results seen."""

    nc: Client
    settings: Settings
    authority: NodeKey
    root: Path
    body: dict[str, Any]
    arrived: dict[str, tuple[float, ResultBody]] = field(default_factory=dict)
    """First result per job id: when it arrived here, and the result."""
    attempts: dict[str, list[int]] = field(default_factory=dict)
    _new: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def first(self) -> str:
        model: str = self.body["models"][0]["id"]
        return model

    async def on_result(self, msg: Msg) -> None:
        body = validate(ResultBody, verify(msg.data).body)
        self.attempts.setdefault(body.job_id, []).append(body.attempt)
        self.arrived.setdefault(body.job_id, (time.monotonic(), body))
        self._new.set()

    async def done(self, job_ids: Iterable[str]) -> None:
        wanted = set(job_ids)
        while not wanted <= self.arrived.keys():
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), 300)

    async def publish(self, model: str, job_id: str, max_tokens: int) -> float:
        body: dict[str, Any] = {"job_id": job_id, "model_id": model, "prompt": job_id}
        body["params"] = {"max_tokens": max_tokens}
        sent = time.monotonic()
        await self.nc.jetstream().publish(
            self.settings.subject("jobs", model),
            msgpack.packb(body),
            headers={"Nats-Msg-Id": job_id},
        )
        return sent

    async def snapshot(self, body: dict[str, Any]) -> None:
        self.body = body
        envelope = self.authority.sign(EnvelopeType.CONFIG, body)
        await publish_snapshot(self.nc, config_bucket(self.settings), envelope)


async def blob_model(net: Net, name: str) -> dict[str, Any]:
    """Another model for the echo engine (any bytes do) in the object store; its spec."""
    data = f"model {name} ".encode() * 1000
    path = net.root / f"{name}.bin"
    path.write_bytes(data)
    await put_file(net.nc.jetstream(), net.settings.models_bucket, name, path)
    return {
        "id": name,
        "version": "1",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "source": f"nats-object://{net.settings.models_bucket}/{name}",
        "validation": [],
    }


@contextlib.asynccontextmanager
async def network(backend: str) -> AsyncIterator[Net]:
    """The demo echo model and a second one, approved by snapshot 2."""
    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="rst-bench-lo-") as tmp:
        root = Path(tmp)
        authority = NodeKey.generate()
        write_key_file(root / "seeder.key")
        settings = Settings(
            nats_url=server.url,
            key_file=root / "seeder.key",
            cache_dir=root / "seed-cache",
            state_dir=root / "seed-state",
            authority_keys=(authority.node_id,),
            runtime_backend=backend,
            # the bench's own loopback server: no users, no TLS, no registry
            nats_insecure=True,
            admission_required=False,
        )
        plan = DevPlan(root / "dev", 0, "echo", backend, "hi")
        snapshot = await seed_network(settings, authority, plan, version=1)
        async with connected(server.url) as nc:
            net = Net(nc, settings, authority, root, snapshot.model_dump(mode="json"))
            body = net.body | {"version": 2}
            body["models"] = [*body["models"], await blob_model(net, SECOND)]
            await net.snapshot(body)
            sub = await nc.subscribe(settings.subject("results", ">"), cb=net.on_result)
            try:
                yield net
            finally:
                await sub.unsubscribe()


@contextlib.asynccontextmanager
async def agents(net: Net, names: list[str], **overrides: Any) -> AsyncIterator[list[Agent]]:
    """Agents serving under the snapshot in force; `overrides` per agent by name are given
    as `<name>_<setting>`, the rest apply to every agent."""
    stop = asyncio.Event()
    started: list[tuple[Agent, asyncio.Task[None]]] = []
    try:
        for name in names:
            home = net.root / f"{name}-{time.monotonic_ns()}"
            key = write_key_file(home / "node.key")
            own = {
                k.removeprefix(f"{name}_"): v
                for k, v in overrides.items()
                if k.startswith(f"{name}_")
            }
            common = {
                k: v for k, v in overrides.items() if not any(k.startswith(f"{n}_") for n in names)
            }
            settings = net.settings.model_copy(
                update={
                    "key_file": home / "node.key",
                    "cache_dir": home / "cache",
                    "state_dir": home / "state",
                    "switch_min_residency_s": 0.0,
                    "switch_check_interval_s": 0.05,
                    "switch_grace_s": 30.0,
                    "shutdown_grace_s": 0.0,
                    "metrics_port": None,
                }
                | common
                | own
            )
            agent = Agent(settings, key)
            await agent.__aenter__()
            started.append((agent, asyncio.create_task(agent.serve(stop))))
        for agent, _ in started:
            await asyncio.wait_for(agent.wait_serving(net.body["version"]), 300)
            # the rest of the loadout verified in the cache, so a switch costs no download
            await asyncio.wait_for(agent.wait_until(_prefetched(agent)), 300)
        yield [a for a, _ in started]
    finally:
        stop.set()
        for agent, task in started:
            await task
            await agent.__aexit__(None, None, None)


def _prefetched(agent: Agent) -> Callable[[], bool]:
    """Whether every model of the agent's loadout is verified in its cache."""
    want = set(agent.loadout().ids())

    def check() -> bool:
        ready = {m.id for m in agent.status().models if m.state.value in ("ready", "active")}
        return want <= ready

    return check


async def switch_downtime(net: Net, backend: str, switches: int) -> dict[str, Any]:
    """Last result of the loaded model -> first result of the other (one-token jobs), one
    switch each, alternated with the runtime's own cold start (supervisor to ready)."""
    from bench.runtime import echo_launch
    from worker.runtime.supervisor import Supervisor, create_backend

    downtimes: list[float] = []
    colds: list[float] = []
    async with agents(net, ["switcher"]) as (agent,):
        for rep, side in alternated(("switch", "cold_start"), switches):
            if side == "cold_start":
                with tempfile.TemporaryDirectory(prefix="rst-bench-cold-") as tmp:
                    launch = await echo_launch(Path(tmp), backend)
                    settings = agent.settings.model_copy(update={"cache_dir": Path(tmp) / "c"})
                    t0 = time.perf_counter()
                    sup = Supervisor(
                        settings,
                        create_backend(settings, node_id=f"bench-lo-{os.getpid()}"),
                        launch,
                    )
                    await sup.__aenter__()
                    colds.append(time.perf_counter() - t0)
                    await sup.aclose()
                continue
            assert agent.model is not None
            loaded = agent.model.id
            other = SECOND if loaded == net.first else net.first
            last = f"sw{rep}-last"
            await net.publish(loaded, last, 1)
            await net.done([last])
            first = f"sw{rep}-first"
            await net.publish(other, first, 1)
            await net.done([first])
            downtimes.append(net.arrived[first][0] - net.arrived[last][0])
        switched = agent.switches
    added = [(d - c) / c for d, c in zip(downtimes, colds, strict=True)]
    figures = {
        "backend": backend,
        "switches": switched,
        "downtime_s": summary(downtimes),
        "cold_start_s": summary(colds),
        "added_over_cold_start": summary(added),
    }
    ratio = summary([d / c for d, c in zip(downtimes, colds, strict=True)])
    return record(
        "switch downtime (last old result -> first new) / runtime cold start (echo)",
        figures,
        ratio,
        "<= 1.10 (a switch adds at most 10 % to the cold start)",
        spread_limit=0.10,
    )


async def jobs_cut(net: Net, reps: int, jobs: int) -> dict[str, Any]:
    """Jobs in flight (1 s each) while a snapshot that does not touch the loaded model is
    applied (another model approved): how many ran again (attempt > 1) or went missing."""
    cut: list[int] = []
    # From here on echo is slowed down (a job's run time is its tokens times the delay);
    # the switch row ran without, so that the validation vectors after each load cost
    # what they would on a real engine, next to nothing against the cold start.
    body = net.body | {"version": net.body["version"] + 1}
    body["runtime"] = body["runtime"] | {"engine_args": {"token_delay_ms": TOKEN_DELAY_MS}}
    await net.snapshot(body)
    async with agents(net, ["steady"], models=(net.first,)) as (agent,):
        for rep in range(reps):
            ids = [f"cut{rep}-{i}" for i in range(jobs)]
            for job_id in ids:
                await net.publish(net.first, job_id, 50)
            await asyncio.wait_for(
                agent.wait_until(
                    lambda: agent.pipeline is not None and agent.pipeline.in_flight == jobs
                ),
                120,
            )
            body = net.body | {"version": net.body["version"] + 1}
            body["models"] = [*body["models"], await blob_model(net, f"unrelated{rep}")]
            await net.snapshot(body)
            await asyncio.wait_for(agent.wait_serving(body["version"]), 120)
            await net.done(ids)
            cut.append(sum(max(net.attempts[j]) > 1 or len(net.attempts[j]) > 1 for j in ids))
    figures = {"jobs_in_flight_per_rep": jobs, "reps": reps, "jobs_cut": summary(cut)}
    return record(
        "jobs cut by a snapshot that does not touch the loaded model",
        figures,
        sum(cut),
        "0",
    )


async def alternating(net: Net, reps: int, bursts: int, burst: int) -> dict[str, Any]:
    """Bursts of `burst` jobs (5 tokens each), alternately for each model, each published
    when the previous one is answered: two nodes with both models in their loadout against
    two nodes pinned to one model each. Jobs/s over the whole run, p99 wait (publish ->
    result)."""
    rates: dict[str, list[float]] = {"loadout": [], "pinned": []}
    p99s: dict[str, list[float]] = {"loadout": [], "pinned": []}
    models = [net.first, SECOND]
    for rep, side in alternated(("loadout", "pinned"), reps):
        if side == "pinned":
            overrides: dict[str, Any] = {"a_models": (net.first,), "b_models": (SECOND,)}
        else:
            overrides = {"models": (net.first, SECOND)}
        async with agents(net, ["a", "b"], **overrides):
            waits: list[float] = []
            t0 = time.monotonic()
            for b in range(bursts):
                model = models[b % 2]
                ids = [f"alt-{side}{rep}-{b}-{i}" for i in range(burst)]
                sent = {job_id: await net.publish(model, job_id, 5) for job_id in ids}
                await net.done(ids)
                waits += [net.arrived[j][0] - sent[j] for j in ids]
            elapsed = time.monotonic() - t0
        rates[side].append(bursts * burst / elapsed)
        p99s[side].append(percentile(waits, 0.99))
    figures = {
        "bursts": bursts,
        "jobs_per_burst": burst,
        "loadout_jobs_per_s": summary(rates["loadout"]),
        "pinned_jobs_per_s": summary(rates["pinned"]),
        "loadout_p99_wait_s": summary(p99s["loadout"]),
        "pinned_p99_wait_s": summary(p99s["pinned"]),
    }
    ratio = summary([a / b for a, b in zip(rates["loadout"], rates["pinned"], strict=True)])
    return record(
        "two models alternating: 2 nodes with a loadout of both vs 2 pinned (jobs/s ratio)",
        figures,
        ratio,
        "report (loadout jobs/s over pinned)",
        spread_limit=0.10,
    )


async def main_async(
    backend: str, switches: int, reps: int, cut_jobs: int, bursts: int, burst: int
) -> list[dict[str, Any]]:
    out = []
    async with network(backend) as net:
        out.append(await switch_downtime(net, backend, switches))
        out.append(await jobs_cut(net, reps, cut_jobs))
        out.append(await alternating(net, reps, bursts, burst))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadout", description=__doc__)
    parser.add_argument("--backend", choices=("docker", "process"), default="docker")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cut-jobs", type=int, default=8)
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--burst", type=int, default=40)
    args = parser.parse_args()
    rows = asyncio.run(
        main_async(args.backend, args.switches, args.reps, args.cut_jobs, args.bursts, args.burst)
    )
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
