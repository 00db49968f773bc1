"""The fixtures themselves work against the real servers."""

from typing import Any

import nats
import pytest
from nats.aio.client import Client

from tests.support import edges
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


def test_docker_fixture_is_a_live_engine_client(docker_client: Any) -> None:
    import docker

    assert isinstance(docker_client, docker.DockerClient)
    assert docker_client.ping()
    assert docker_client.version()["ApiVersion"]


@pytest.mark.parametrize(
    ("in_ci", "outcome"), [(False, pytest.skip.Exception), (True, pytest.fail.Exception)]
)
def test_unavailable_skips_locally_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, in_ci: bool, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(edges, "IN_CI", in_ci)
    with pytest.raises(outcome, match="no nats-server here"):
        edges.unavailable("no nats-server here")
