"""A node that the registry does not admit starts, says so (status, log) and serves
nothing; once the authority admits it, it serves (a stranger's cancel does not reach it),
and once revoked it stops.
On a network run as `dev` runs it: TLS, a user per role, the node with the node role's
permissions only."""

import asyncio
from pathlib import Path

import msgpack
import pytest

from schemas.node import NodeState
from tests.support.agent import running, serving
from tests.support.forgery import admit, revoke
from tests.support.securenet import SecureNats
from worker.client import new_job_id, submit
from worker.core.roles import Role
from worker.core.signing import NodeKey, load_key_file
from worker.devtools.devnet import DevPlan, seed_network

pytestmark = pytest.mark.nats


async def test_a_node_serves_only_once_admitted(
    secure_nats: SecureNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    authority = NodeKey.generate()
    common = {
        "authority_keys": (authority.node_id,),
        "runtime_backend": "process",
        "shutdown_grace_s": 2,
    }
    network = secure_nats.settings(Role.AUTHORITY, **common)
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    snapshot = await seed_network(network, authority, plan, version=1)
    node_settings = secure_nats.settings(Role.NODE, tmp_path / "node", apply_retry_s=0.1, **common)
    node = load_key_file(node_settings.key_file)
    async with running(node_settings) as agent:
        await asyncio.wait_for(
            agent.wait_until(lambda: agent.node_state is NodeState.OUT_OF_SERVICE), 60
        )
        assert agent.status().admitted is False
        assert "not admitted" in caplog.text
        authority_nc = await secure_nats.connect(Role.AUTHORITY)
        try:
            await admit(authority_nc, network, authority, node)
        finally:
            await authority_nc.close()
        await serving(agent, 60)
        assert agent.status().admitted is True
        job = {"job_id": new_job_id(), "model_id": snapshot.models[0].id, "prompt": "hi"}
        # A stranger on the bus cancels the job before it is published (a cancel up to 60 s
        # early still applies): nats-server refuses it, so the job runs.
        stranger = await secure_nats.connect(Role.NODE)
        try:
            cancel_subject = network.subject("cancel", job["job_id"])
            await stranger.publish(cancel_subject, msgpack.packb({"job_id": job["job_id"]}))
            await stranger.flush()
            await secure_nats.wait_violation(cancel_subject)
        finally:
            await stranger.close()
        client_nc = await secure_nats.connect(Role.CLIENT)
        try:
            client = secure_nats.settings(Role.CLIENT, **common)
            outcome = await submit(client_nc, client, job, wait_s=60)
        finally:
            await client_nc.close()
        # Revoked while serving: it stops serving at once.
        authority_nc = await secure_nats.connect(Role.AUTHORITY)
        try:
            await revoke(authority_nc, network, authority, node)
        finally:
            await authority_nc.close()
        await asyncio.wait_for(
            agent.wait_until(lambda: agent.node_state is NodeState.OUT_OF_SERVICE), 60
        )
        assert agent.status().admitted is False
    assert outcome.result.node_id == node.node_id
    assert secure_nats.violations("") == secure_nats.violations(cancel_subject)
