"""The node as the network's own tests would use it: testcontainers runs the NATS image
(`FROM scratch`) and the agent image from the repo; the test plays the network from the host
(streams, the model in the object store, a signed snapshot), submits jobs and checks each
signed result against a reference run of the same engine."""

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from containers.runtime.engines.echo import EchoEngine, hash_model
from schemas import frames
from schemas.envelope import EnvelopeType
from worker.client import Outcome, new_job_id, submit
from worker.core.settings import Settings
from worker.core.signing import NodeKey, write_key_file
from worker.devtools.demomodel import DemoModel, make_demo_model
from worker.devtools.images import ensure_image
from worker.devtools.stack import ensure_agent_image, ensure_nats_image, wait_for_nats
from worker.jobs.provision import provision
from worker.models.objectstore import put_file
from worker.node.snapshots import config_bucket, publish_snapshot
from worker.runtime.container import runtime_containers

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

MODEL_ID = "echo-demo"
PARAMS = {"max_tokens": 6, "seed": 3}
PROMPTS = [f"prompt number {i}" for i in range(6)]


def _reference(model: DemoModel, prompt: str) -> list[int]:
    """The output the echo engine gives for `prompt` on this model, computed here."""
    engine = EchoEngine(
        hash_model(model.directory), model.sha256, "cpu", lambda _: None, max_frame_bytes=1 << 20
    )
    engine.add(1, frames.parse_request_item({"prompt": prompt, "params": PARAMS}), stream=False)
    out: list[Any] = []
    while engine.has_unfinished():
        out += engine.step()
    (done,) = [frame for frame in out if frame["t"] == "done"]
    token_ids: list[int] = done["token_ids"]
    return token_ids


async def _play_network(
    settings: Settings, authority: NodeKey, model: DemoModel, image: str
) -> None:
    await wait_for_nats(settings.nats_url, 30)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await provision(js, settings, [MODEL_ID])
        name = f"{MODEL_ID}-{model.sha256[:12]}"
        await put_file(js, settings.models_bucket, name, model.archive)
        vector_prompt = "validation vector"
        expected = hashlib.sha256(msgpack.packb(_reference(model, vector_prompt))).hexdigest()
        body = {
            "network": settings.network,
            "version": int(time.time()),
            "issued_at": time.time(),
            "runtime": {"name": "echo", "image": image, "engine": "echo", "engine_args": {}},
            "models": [
                {
                    "id": MODEL_ID,
                    "version": "1",
                    "sha256": model.sha256,
                    "size": model.size,
                    "source": f"nats-object://{settings.models_bucket}/{name}",
                    "validation": [
                        {"prompt": vector_prompt, "params": PARAMS, "expected_sha256": expected}
                    ],
                }
            ],
        }
        await publish_snapshot(
            nc, config_bucket(settings), authority.sign(EnvelopeType.CONFIG, body)
        )
    finally:
        await nc.close()


async def _submit_all(settings: Settings) -> list[Outcome]:
    nc = await nats.connect(settings.nats_url)
    try:
        jobs = [
            {"job_id": new_job_id(), "model_id": MODEL_ID, "prompt": p, "params": PARAMS}
            for p in PROMPTS
        ]
        return list(await asyncio.gather(*(submit(nc, settings, j, wait_s=120) for j in jobs)))
    finally:
        await nc.close()


def test_agent_image_serves_jobs_published_from_the_host(
    docker_client: Any, tmp_path: Path
) -> None:
    nats_image = ensure_nats_image(client=docker_client)
    agent_image, _ = ensure_agent_image(client=docker_client)
    runtime_image = ensure_image("echo", client=docker_client)
    node = write_key_file(tmp_path / "node_key")
    authority = NodeKey.generate()
    model = make_demo_model(tmp_path / "models", "echo")
    # The engine bind-mounts model dirs by host path: the cache sits at the same path inside.
    cache = tmp_path / "cache"
    cache.mkdir()

    with (
        Network() as network,
        DockerContainer(nats_image.tag)
        .with_network(network)
        .with_network_aliases("nats")
        .with_exposed_ports(4222) as nats_container,
    ):
        url = f"nats://127.0.0.1:{nats_container.get_exposed_port(4222)}"
        settings = Settings(
            nats_url=url, authority_keys=(authority.node_id,), admission_required=False
        )
        asyncio.run(_play_network(settings, authority, model, runtime_image))

        agent = (
            DockerContainer(agent_image.tag)
            .with_network(network)
            .with_command("run")
            .with_env("RESULTITY_NATS_URL", "nats://nats:4222")
            .with_env("RESULTITY_NATS_INSECURE", "1")
            .with_env("RESULTITY_ADMISSION_REQUIRED", "0")
            .with_env("RESULTITY_AUTHORITY_KEYS", authority.node_id)
            .with_env("RESULTITY_CACHE_DIR", str(cache))
            .with_volume_mapping(str(tmp_path / "node_key"), "/run/secrets/node_key", "ro")
            .with_volume_mapping("/var/run/docker.sock", "/var/run/docker.sock", "rw")
            .with_volume_mapping(str(cache), str(cache), "rw")
        )
        leftovers: list[Any] = []
        try:
            agent.start()
            try:
                outcomes = asyncio.run(_submit_all(settings))
            except TimeoutError as exc:
                logs = agent.get_wrapped_container().logs(tail=60).decode(errors="replace")
                raise AssertionError(f"no results; agent log:\n{logs}") from exc
        finally:
            # A graceful stop first: the agent's shutdown sequence removes its runtime
            # container; testcontainers' own stop is a forced removal.
            wrapped = agent.get_wrapped_container()
            if wrapped is not None:
                wrapped.stop(timeout=40)
            agent.stop()
            leftovers = runtime_containers(docker_client, node.node_id)
            for container in leftovers:
                container.remove(force=True)

    # submit() verified each signature and input hash; check who signed and what ran.
    for prompt, outcome in zip(PROMPTS, outcomes, strict=True):
        result = outcome.result
        assert result.node_id == node.node_id
        assert result.model.sha256 == model.sha256
        assert result.runtime.image == runtime_image
        assert result.output.token_ids == _reference(model, prompt)
    assert len({o.result.job_id for o in outcomes}) == len(PROMPTS)
    assert not leftovers, "the agent left its runtime container behind"
