"""The fixtures themselves work against the real servers."""

import nats
import pytest
from nats.aio.client import Client

from worker.devtools.natsd import NatsServer


async def test_nats_fixture_has_jetstream(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(name="T", subjects=["t.>"])
    ack = await js.publish("t.x", b"hello")
    assert ack.seq == 1
    info = await js.stream_info("T")
    assert info.state.messages == 1


async def test_nats_restart_keeps_port_and_file_store(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="K", subjects=["k.>"])
    await js.publish("k.1", b"kept")
    await nc.close()
    url = nats_server.url
    nats_server.restart()
    assert nats_server.url == url
    nc = await nats.connect(nats_server.url)
    msg = await nc.jetstream().get_msg("K", 1)
    assert msg.data == b"kept"
    await nc.close()


def test_docker_fixture_runs_a_container(docker_client: object) -> None:
    import docker

    client = docker_client
    assert isinstance(client, docker.DockerClient)
    assert client.ping()
    images = client.images.list()
    assert isinstance(images, list)


@pytest.mark.parametrize("bad", ["", "zz"])
def test_unavailable_reason_is_clear(bad: str) -> None:
    from worker.core.signing import parse_public_key

    with pytest.raises(ValueError, match="Ed25519 public key"):
        parse_public_key(bad)
