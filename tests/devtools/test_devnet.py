"""`resultity-node dev --model A --model B`: the dev network publishes both models, and
the node's status lists both with their states (real nats-server, echo engine)."""

import json
from pathlib import Path

import pytest

from tests.support.agent import running, serving
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer

pytestmark = pytest.mark.nats


def model_dir(root: Path, name: str) -> Path:
    """A directory that passes for a Hugging Face model (echo never reads it)."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"name": name}))
    (directory / "tokenizer_config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(name.encode() * 100)
    return directory


async def test_two_model_directories_make_a_loadout_of_two(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    authority = NodeKey.generate()
    settings = make_settings(
        tmp_path,
        nats_url=nats_server.url,
        authority_keys=(authority.node_id,),
        runtime_backend="process",
    )
    plan = DevPlan(
        tmp_path / "dev",
        0,
        "echo",
        "process",
        "hi",
        model_dir(tmp_path, "first"),
        more_model_dirs=(model_dir(tmp_path, "second"),),
    )
    snapshot = await seed_network(settings, authority, plan, version=1)
    assert [m.id for m in snapshot.models] == ["first", "second"]
    assert all(m.validation for m in snapshot.models)
    async with running(settings) as agent:
        await serving(agent)
        want = [("first", "active"), ("second", "ready")]
        await wait_for(lambda: [(m.id, m.state.value) for m in agent.status().models] == want)
