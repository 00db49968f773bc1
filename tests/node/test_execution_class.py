"""Execution classes end to end on a CPU node (issue 23 item 4): a snapshot with a
`cpu-fp32` entry and one for a class this node is not. The node applies its own class's
runtime and vectors, and its results say which class made them; a snapshot without an entry
for it is refused with a signed error naming the class, and the node serves nothing."""

from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from schemas.envelope import EnvelopeType
from schemas.event import ErrorCode
from schemas.node import NodeState
from schemas.snapshot import Snapshot
from tests.support.agent import running, serving
from tests.support.jobnet import errors
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.client import submit
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.node.snapshots import config_bucket, publish_snapshot
from worker.runtime.hardware import CPU_CLASS

pytestmark = pytest.mark.nats

HOPPER = "nvidia-hopper-bf16"


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
        ack_wait_s=10,
        shutdown_grace_s=5,
    )


def with_classes(snapshot: Snapshot, version: int, classes: dict[str, Any]) -> dict[str, Any]:
    """`snapshot` as version `version` with `classes`, and a default runtime that never
    becomes ready: a node that ran the default instead of its class's entry would hang."""
    body = snapshot.model_dump(mode="json")
    body["runtime"]["engine_args"] = {"fault": "noready"}
    return body | {"version": version, "classes": classes}


async def test_a_node_applies_its_own_class_and_results_name_it(
    settings: Settings, authority: NodeKey, tmp_path: Path, nc: Client
) -> None:
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot = await seed_network(settings, authority, plan, version=1)
    model = snapshot.models[0]
    runtime = snapshot.runtime.model_dump(mode="json")
    vectors = [v.model_dump(mode="json") for v in model.validation]
    assert vectors, "the dev network's model carries vectors made on this CPU"
    wrong = [v | {"expected_sha256": "0" * 64} for v in vectors]
    classes = {
        CPU_CLASS: {"runtime": runtime, "validation": {model.id: vectors}},
        HOPPER: {"runtime": runtime, "validation": {model.id: wrong}},
    }
    bucket = config_bucket(settings)
    async with running(settings) as agent:
        await serving(agent)
        body = with_classes(snapshot, 2, classes)
        await publish_snapshot(nc, bucket, authority.sign(EnvelopeType.CONFIG, body))
        # The cpu-fp32 entry runs what runs already: applied in place (the default runtime
        # would have needed a new one, never ready).
        await wait_for(
            lambda: agent.pipeline is not None and agent.pipeline.serving.config_version == 2, 30
        )
        job = {"job_id": "c-1", "model_id": model.id, "prompt": "hi", "params": {"max_tokens": 4}}
        out = await submit(nc, settings, job, wait_s=30)
        assert out.result.config_version == 2
        assert out.result.runtime.execution_class == CPU_CLASS
        assert agent.status().validation == "passed"

        body = with_classes(snapshot, 3, {HOPPER: classes[HOPPER]})
        await publish_snapshot(nc, bucket, authority.sign(EnvelopeType.CONFIG, body))

        async def refused() -> bool:
            return any(
                e.code == ErrorCode.CONFIG_REJECTED and CPU_CLASS in e.message
                for e in await errors(nc.jetstream(), settings)
            )

        await wait_for(refused, 30)
        await wait_for(lambda: agent.node_state is not NodeState.SERVING, 30)
        assert agent.model is None
