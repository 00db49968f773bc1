"""Switch claims against a real nats-server: one node at a time holds a model's claim."""

import pytest
from nats.aio.client import Client

from tests.support.settings import make_settings
from worker.devtools.natsd import NatsServer
from worker.node.claims import SwitchClaims

pytestmark = pytest.mark.nats


async def test_one_claim_per_model_until_released(nats_server: NatsServer, nc: Client) -> None:
    settings = make_settings(nats_url=nats_server.url)
    one, two = (SwitchClaims(nc, settings, node) for node in ("aa", "bb"))
    assert await one.claim("m1")
    assert not await two.claim("m1"), "a second claim on a held model"
    assert await two.claim("m2"), "claims are per model"
    await one.release("m1")
    assert await two.claim("m1"), "a released claim can be taken again"
    assert not await one.claim("m1")


async def test_a_restarted_node_clears_only_its_own_claims(
    nats_server: NatsServer, nc: Client
) -> None:
    settings = make_settings(nats_url=nats_server.url)
    one, two = (SwitchClaims(nc, settings, node) for node in ("aa", "bb"))
    assert await one.clear_mine() == 0, "an empty bucket"
    assert await one.claim("m1") and await two.claim("m2")
    again = SwitchClaims(nc, settings, "aa")  # node aa, killed mid-switch, starts again
    assert await again.clear_mine() == 1
    assert await two.claim("m1")
    assert not await one.claim("m2"), "another node's claim stays"
