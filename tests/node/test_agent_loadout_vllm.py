"""One on-demand switch with real vLLM (CPU image, two tiny models): a node whose loadout
holds both serves the first, and a job for the second makes it switch once and serve it
(issue 25). Slow: two reference runs and two loads of vLLM."""

from pathlib import Path

import nats
import pytest

from tests.support.agent import running, serving
from tests.support.jobnet import errors
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from tests.support.vllm import HAS_MODEL_DEPS
from worker.client import submit
from worker.core.signing import NodeKey
from worker.devtools.demomodel import SEED, make_tiny_llama
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer

pytestmark = [pytest.mark.docker, pytest.mark.vllm, pytest.mark.nats]


@pytest.mark.timeout(2400)
@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="needs the models extra (torch, transformers)")
async def test_a_vllm_node_switches_once_and_serves_both_models(
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
        switch_min_residency_s=0,
        switch_check_interval_s=0.5,
    )
    second = make_tiny_llama(tmp_path / "tiny-llama-b", seed=SEED + 1)
    plan = DevPlan(
        tmp_path / "dev",
        0,
        "vllm",
        "docker",
        "x",
        more_model_dirs=(second,),
        vectors_dir=vectors_dir,
    )
    snapshot = await seed_network(settings, authority, plan, version=1)
    first, other = (m.id for m in snapshot.models)
    nc = await nats.connect(nats_server.url)
    try:
        async with running(settings) as agent:
            await serving(agent, timeout=900)
            want = [(first, "active"), (other, "ready")]
            await wait_for(
                lambda: [(m.id, m.state.value) for m in agent.status().models] == want, 300
            )
            job = {"model_id": first, "prompt": "The node signs", "params": {"max_tokens": 8}}
            served = await submit(nc, settings, job | {"job_id": "on-first"}, wait_s=600)
            assert served.result.model.id == first and served.result.output.token_ids
            job = job | {"job_id": "on-second", "model_id": other}
            switched = await submit(nc, settings, job, wait_s=1200)
            assert switched.result.model.id == other and switched.result.attempt == 1
            assert switched.result.output.token_ids
            assert agent.switches == 1
            assert [(m.id, m.state.value) for m in agent.status().models] == [
                (first, "ready"),
                (other, "active"),
            ]
        assert await errors(nc.jetstream(), settings) == []
    finally:
        await nc.close()
