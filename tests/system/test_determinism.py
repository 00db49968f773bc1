"""Determinism under faults, on real vLLM (CPU image, tiny model), through the whole agent:
a fixed set of jobs gives identical `token_ids` alone, mixed into a batch of 32, after a
runtime replacement, and after a node restart that resumes from its saved snapshot."""

from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest

from schemas.envelope import EnvelopeType
from tests.support.agent import running, serving
from tests.support.jobnet import results
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.client import submit
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.node.snapshots import config_bucket, publish_snapshot

pytestmark = [pytest.mark.docker, pytest.mark.vllm, pytest.mark.nats]

FIXED = [
    {"prompt": "The node signs", "params": {"max_tokens": 12}},
    {"prompt": "Resultity runs jobs", "params": {"max_tokens": 12, "temperature": 0.8, "seed": 7}},
    {"prompt_token_ids": [5, 17, 42, 99], "params": {"max_tokens": 12}},
    {"prompt": "A batch of prompts", "params": {"max_tokens": 12, "temperature": 1.0, "seed": 3}},
]
FILLER = [
    {"prompt": f"filler prompt {i} of the mixed batch", "params": {"max_tokens": 12}}
    for i in range(28)
]


async def alone(nc: Any, settings: Settings, model: str, tag: str) -> list[list[int]]:
    out = []
    for i, body in enumerate(FIXED):
        job = {"job_id": f"{tag}-{i}", "model_id": model, **body}
        outcome = await submit(nc, settings, job, wait_s=300)
        out.append(outcome.result.output.token_ids)
    return out


async def mixed(nc: Any, settings: Settings, model: str, tag: str) -> list[list[int]]:
    """The fixed jobs interleaved with fillers, published at once so they share batches."""
    js = nc.jetstream()
    bodies = [(f"{tag}-f{i}", b) for i, b in enumerate(FILLER)]
    for i, body in enumerate(FIXED):
        bodies.insert(i * 7, (f"{tag}-{i}", body))
    for job_id, body in bodies:
        data = msgpack.packb({"job_id": job_id, "model_id": model, **body})
        await js.publish(settings.subject("jobs", model), data, headers={"Nats-Msg-Id": job_id})
    wanted = {f"{tag}-{i}" for i in range(len(FIXED))}

    async def done() -> bool:
        return wanted <= {r.job_id for r in await results(js, settings)}

    await wait_for(done, timeout=600, interval=1)
    by_id = {r.job_id: r for r in await results(js, settings)}
    return [by_id[f"{tag}-{i}"].output.token_ids for i in range(len(FIXED))]


@pytest.mark.timeout(1800)
async def test_token_ids_survive_batching_replacement_and_restart(
    docker_client: object, nats_server: NatsServer, tmp_path: Path, vectors_dir: Path
) -> None:
    authority = NodeKey.generate()
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        authority_keys=(authority.node_id,),
        runtime_backend="docker",
        runtime_memory="4g",
        request_timeout_s=600,
        ack_wait_s=120,
    )
    snapshot = await seed_network(
        settings,
        authority,
        DevPlan(tmp_path / "dev", 0, "vllm", "docker", "x", vectors_dir=vectors_dir),
        version=1,
    )
    model = snapshot.models[0].id
    nc = await nats.connect(nats_server.url)
    try:
        async with running(settings) as agent:
            await serving(agent, timeout=600)
            first = await alone(nc, settings, model, "alone")
            assert all(first), "every fixed job produced tokens"
            assert await mixed(nc, settings, model, "mixed") == first
            runtime_before = agent.status().runtime["runtime_id"]
            body = snapshot.model_dump(mode="json") | {"version": 2}
            # something the runtime runs must change, or the snapshot is applied in place
            body["runtime"]["engine_args"] = {"max_num_seqs": 64}
            await publish_snapshot(
                nc, config_bucket(settings), authority.sign(EnvelopeType.CONFIG, body)
            )

            await serving(agent, timeout=600, config_version=2)
            assert agent.status().runtime["runtime_id"] != runtime_before
            assert await alone(nc, settings, model, "replaced") == first
        # the node restarts and the network has forgotten the snapshot: it resumes from disk
        await nc.jetstream().delete_key_value(config_bucket(settings))
        async with running(settings) as agent:
            await serving(agent, timeout=600)
            assert agent.snapshot is not None and agent.snapshot.version == 2
            assert await alone(nc, settings, model, "restarted") == first
    finally:
        await nc.close()
