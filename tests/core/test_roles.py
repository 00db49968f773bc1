"""Who may do what on the bus, enforced by nats-server itself: a server configured as
`dev` configures it (TLS with a local CA, one nkey user per role with `worker.core.roles`'
permissions) lets each role do its part and refuses each forbidden action."""

import asyncio
import socket

import msgpack
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig

from tests.support.polling import wait_for
from tests.support.securenet import SecureNats
from worker.core.credentials import tls_context
from worker.core.roles import Role, authorization_block, permissions
from worker.jobs.provision import consumer_name, provision

pytestmark = pytest.mark.nats
MODEL = "m1"


async def _provisioned(net: SecureNats) -> None:
    authority = await net.connect(Role.AUTHORITY)
    try:
        settings = net.settings(Role.AUTHORITY)
        await provision(authority.jetstream(), settings, [MODEL])
        await authority.jetstream().create_key_value(KeyValueConfig(bucket="rst_config"))
    finally:
        await authority.close()


def test_the_block_lists_each_users_role() -> None:
    block = authorization_block({Role.NODE: ["UNODE"], Role.CLIENT: ["UCLIENT"]})
    assert '"nkey": "UNODE"' in block and '"nkey": "UCLIENT"' in block
    node = permissions(Role.NODE)
    assert "rst.jobs.*" not in node["publish"]["allow"]  # type: ignore[index]
    assert "rst.results.*" not in permissions(Role.CLIENT)["publish"]["allow"]  # type: ignore[index]


async def test_each_role_does_its_part(secure_nats: SecureNats) -> None:
    """Job in (client), pulled and answered (node), result read back (client)."""
    await _provisioned(secure_nats)
    client = await secure_nats.connect(Role.CLIENT)
    node = await secure_nats.connect(Role.NODE)
    try:
        ack = await client.jetstream().publish(
            f"rst.jobs.{MODEL}", b"job", headers={"Nats-Msg-Id": "j1"}
        )
        assert ack.seq == 1
        pull = await node.jetstream().pull_subscribe_bind(
            consumer_name(secure_nats.settings(Role.NODE), MODEL), stream="RST_JOBS"
        )
        [msg] = await pull.fetch(1, timeout=5)
        await node.jetstream().publish("rst.results.j1", b"result")
        await msg.ack_sync(timeout=5)
        results = await client.jetstream().subscribe(
            "rst.results.j1",
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        assert (await results.next_msg(timeout=5)).data == b"result"
        await results.unsubscribe()
    finally:
        await client.close()
        await node.close()
    assert not secure_nats.violations(""), secure_nats.errors


async def test_a_connection_without_credentials_is_refused(secure_nats: SecureNats) -> None:
    ca = secure_nats.credentials.tls.ca
    with pytest.raises(Exception, match="(?i)authorization"):
        async with asyncio.timeout(10):
            await nats.connect(
                secure_nats.server.url,
                tls=tls_context(ca),
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )


async def test_a_plaintext_connection_is_refused_when_tls_is_required(
    secure_nats: SecureNats,
) -> None:
    def talk_plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", secure_nats.server.port), timeout=5) as sock:
            info = sock.recv(4096)
            assert b'"tls_required":true' in info
            sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            return received

    assert b"PONG" not in await asyncio.to_thread(talk_plaintext)


@pytest.mark.parametrize(
    ("role", "subject"),
    [
        (Role.CLIENT, "rst.results.job-1"),
        (Role.CLIENT, "rst.stream.job-1"),
        (Role.CLIENT, "rst.events.error.n1"),
        (Role.GATEWAY, "rst.results.job-1"),
        (Role.NODE, f"rst.jobs.{MODEL}"),
        (Role.NODE, "rst.cancel.job-1"),
        (Role.NODE, "$KV.rst_config.snapshot"),
        (Role.NODE, "$KV.rst_nodes.n1"),
    ],
)
async def test_a_forbidden_publish_is_refused_by_the_server(
    secure_nats: SecureNats, role: Role, subject: str
) -> None:
    nc = await secure_nats.connect(Role.GATEWAY if role is Role.GATEWAY else role)
    watcher = await secure_nats.connect(Role.AUTHORITY)
    try:
        violation = await _publish_refused(secure_nats, nc, subject)
        assert "publish" in violation.lower()
    finally:
        await nc.close()
        await watcher.close()


async def _publish_refused(net: SecureNats, nc: nats.NATS, subject: str) -> str:
    await nc.publish(subject, msgpack.packb({"job_id": "job-1"}))
    await nc.flush(timeout=5)
    return await net.wait_violation(subject)


async def test_a_node_cannot_write_the_config_bucket(secure_nats: SecureNats) -> None:
    await _provisioned(secure_nats)
    node = await secure_nats.connect(Role.NODE)
    try:
        kv = await node.jetstream().key_value("rst_config")  # reading is allowed
        with pytest.raises(Exception):  # noqa: B017 - nats-py times out: nothing stored
            await kv.put("snapshot", b"forged")
        await secure_nats.wait_violation("$KV.rst_config.snapshot")
    finally:
        await node.close()


async def test_a_gateway_cannot_pull_a_nodes_jobs(secure_nats: SecureNats) -> None:
    await _provisioned(secure_nats)
    gateway = await secure_nats.connect(Role.GATEWAY)
    try:
        pull = await gateway.jetstream().pull_subscribe_bind(
            consumer_name(secure_nats.settings(Role.GATEWAY), MODEL), stream="RST_JOBS"
        )
        with pytest.raises(Exception):  # noqa: B017 - the request goes nowhere
            await pull.fetch(1, timeout=2)
        await secure_nats.wait_violation("$JS.API.CONSUMER.MSG.NEXT.RST_JOBS")
    finally:
        await gateway.close()


async def test_a_client_cannot_subscribe_to_jobs(secure_nats: SecureNats) -> None:
    client = await secure_nats.connect(Role.CLIENT)
    try:
        await client.subscribe("rst.jobs.>")
        await client.flush(timeout=5)
        await wait_for(
            lambda: any("subscription" in str(e).lower() for e in secure_nats.errors),
            timeout=5,
            interval=0.02,
        )
    finally:
        await client.close()
