"""`worker.client.submit` takes a result only from a node the registry admits: a stranger's
result with the job's real input hash, and a revoked node's, are skipped (issue 21)."""

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client

from tests.support.forgery import admit, publish_result, result, revoke, take_job
from tests.support.settings import make_settings
from worker.client import new_job_id, submit
from worker.core.signing import NodeKey
from worker.devtools.natsd import NatsServer
from worker.jobs.provision import provision

pytestmark = pytest.mark.nats


async def test_only_an_admitted_nodes_result_is_taken(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    authority, honest, stranger, revoked = (NodeKey.generate() for _ in range(4))
    settings = make_settings(
        tmp_path, nats_url=nats_server.url, admission_required=True,
        authority_keys=(authority.node_id,),
    )  # fmt: skip
    await provision(nc.jetstream(), settings, ["m1"])
    await admit(nc, settings, authority, honest)
    await admit(nc, settings, authority, revoked)
    await revoke(nc, settings, authority, revoked)
    job = {"job_id": new_job_id(), "model_id": "m1", "prompt": "hi"}
    outcome = asyncio.create_task(submit(nc, settings, job, wait_s=60))
    taken, data = await take_job(nc, settings, "m1")
    job_id = taken["job_id"]
    for key, text in ((stranger, "forged"), (revoked, "revoked")):
        await publish_result(nc, settings, job_id, result(key, settings, taken, data, text), text)
    await publish_result(
        nc, settings, job_id, result(honest, settings, taken, data, "honest"), job_id
    )
    answer = await outcome
    assert answer.result.node_id == honest.node_id
    assert answer.result.output.text == "honest"
