"""Whose messages the gateway takes: only an admitted, unrevoked node's results, stream
messages and error events, and the key is checked before the signature (a flood of
strangers' messages costs no verification); messages are routed by job id once, not
examined by every waiting request (issue 20 item 7, issue 21)."""

import asyncio
import time
from pathlib import Path

import httpx
import msgpack
import openai
import pytest
from nats.aio.client import Client

from schemas.envelope import EnvelopeType, RawEnvelope
from schemas.snapshot import Snapshot
from tests.support.forgery import admit, publish_result, result, stream_part, take_job
from tests.support.gateway import API_KEY, OTHER_API_KEY, api_headers, client, node_settings
from tests.support.polling import wait_for
from worker.core import signing
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.gateway.app import running as gateway
from worker.node.snapshots import config_bucket, publish_snapshot

pytestmark = pytest.mark.nats

WAITING = 8
FLOOD = 40


@pytest.fixture
def authority() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path, authority: NodeKey) -> Settings:
    return node_settings(
        nats_server, tmp_path, authority, admission_required=True, gateway_timeout_s=60
    )


@pytest.fixture
async def snapshot(settings: Settings, authority: NodeKey, tmp_path: Path) -> Snapshot:
    plan = DevPlan(tmp_path / "dev", 0, "echo", "process", "hi")
    return await seed_network(settings, authority, plan, version=1)


def error_event(node: NodeKey, settings: Settings, job_id: str, message: str) -> bytes:
    body = {
        "node_id": node.node_id,
        "network": settings.network,
        "code": "INTERNAL",
        "message": message,
        "retryable": False,
        "at": time.time(),
        "job_id": job_id,
        "attempt": 1,
    }
    return node.sign(EnvelopeType.ERROR, body)


class Verifications:
    """Counts Ed25519 signature checks (the work a flood costs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = signing.check_signature

        def counting(env: RawEnvelope) -> None:
            self.count += 1
            real(env)

        monkeypatch.setattr(signing, "check_signature", counting)


async def waiting_jobs(
    nc: Client, settings: Settings, http: httpx.AsyncClient, model: str, count: int
) -> tuple[list[str], list["asyncio.Task[httpx.Response]"]]:
    """`count` requests in flight at the gateway (no node serves them), and their job ids."""
    jobs = await nc.subscribe(settings.subject("jobs", ">"))
    requests = [
        asyncio.create_task(http.post("/v1/completions", json={"model": model, "prompt": f"{i}"}))
        for i in range(count)
    ]
    job_ids = []
    for _ in range(count):
        job_ids.append(msgpack.unpackb((await jobs.next_msg(timeout=30)).data)["job_id"])
    await jobs.unsubscribe()
    return job_ids, requests


async def test_a_flood_of_error_events_costs_one_check_each_and_none_for_strangers(
    settings: Settings,
    snapshot: Snapshot,
    authority: NodeKey,
    nc: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the waiting jobs' own final events from the admitted node are verified: the
    stranger's are dropped by key, the admitted node's events for jobs nobody waits for by
    job id, each looked at once. Failed before the fix: every waiting request verified every
    event it saw, the stranger's too (72 checks here), and the stranger's forged final
    errors were the answers."""
    honest, stranger = NodeKey.generate(), NodeKey.generate()
    await admit(nc, settings, authority, honest)
    async with (
        gateway(settings, port=0) as url,
        httpx.AsyncClient(base_url=url, timeout=60, headers=api_headers()) as http,
    ):
        job_ids, requests = await waiting_jobs(nc, settings, http, snapshot.models[0].id, WAITING)
        checks = Verifications(monkeypatch)
        subject = settings.subject("events", "error")
        for i in range(FLOOD):
            await nc.publish(
                f"{subject}.{honest.node_id}", error_event(honest, settings, f"job-o{i}", "other")
            )
            await nc.publish(
                f"{subject}.{stranger.node_id}",
                error_event(stranger, settings, job_ids[i % WAITING], "forged"),
            )
        for job_id in job_ids:
            await nc.publish(
                f"{subject}.{honest.node_id}", error_event(honest, settings, job_id, "honest")
            )
        answers = await asyncio.gather(*requests)
    assert checks.count == WAITING
    assert [a.status_code for a in answers] == [502] * WAITING
    assert all("honest" in a.json()["error"]["message"] for a in answers)


async def test_forged_stream_and_result_never_reach_the_client(
    settings: Settings, snapshot: Snapshot, authority: NodeKey, nc: Client
) -> None:
    """A stranger answers first with stream text and a result carrying the job's real input
    hash; the client gets the admitted node's stream and result, and its node id."""
    honest, stranger = NodeKey.generate(), NodeKey.generate()
    await admit(nc, settings, authority, honest)
    spec = snapshot.models[0]
    model = {"id": spec.id, "version": spec.version, "sha256": spec.sha256}

    async def nodes() -> str:
        job, data = await take_job(nc, settings, spec.id)
        job_id, subject = job["job_id"], settings.subject("stream", job["job_id"])
        await nc.publish(subject, stream_part(stranger, settings, job_id, 0, "FORGED"))
        forged = result(stranger, settings, job, data, "FORGED", model)
        await publish_result(nc, settings, job_id, forged, "forged-" + job_id)
        await nc.publish(subject, stream_part(honest, settings, job_id, 0, "Hello"))
        await nc.publish(
            subject, stream_part(honest, settings, job_id, 1, " world", finish_reason="stop")
        )
        honest_result = result(honest, settings, job, data, "Hello world", model)
        await publish_result(nc, settings, job_id, honest_result, job_id)
        return job_id

    async with gateway(settings, port=0) as url, client(url) as api:
        played = asyncio.create_task(nodes())
        stream = await api.completions.create(model=spec.id, prompt="hi", stream=True)
        chunks = [c async for c in stream]
        await played
        plain = asyncio.create_task(nodes())
        answer = await api.completions.with_raw_response.create(model=spec.id, prompt="hi")
        await plain
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Hello world"
    assert answer.parse().choices[0].text == "Hello world"
    assert answer.headers["x-resultity-node-id"] == honest.node_id


async def test_requests_need_a_valid_api_key(settings: Settings, snapshot: Snapshot) -> None:
    async with gateway(settings, port=0) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/models")).status_code == 401
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer rst-nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        basic = await http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
        assert basic.status_code == 401
        post = await http.post("/v1/completions", json={"model": "x", "prompt": "y"})
        assert post.status_code == 401
        for key in (API_KEY, OTHER_API_KEY):
            assert (await http.get("/v1/models", headers=api_headers(key))).status_code == 200
        async with client(url, api_key="rst-nope") as api:
            with pytest.raises(openai.AuthenticationError):
                await api.models.list()


async def test_models_come_from_the_newest_snapshot_of_its_own_network(
    settings: Settings, snapshot: Snapshot, authority: NodeKey, nc: Client
) -> None:
    bucket = config_bucket(settings)
    first = snapshot.model_dump(mode="python")

    def signed(network: str, version: int, model_id: str) -> bytes:
        body = first | {"network": network, "version": version}
        body["models"] = [first["models"][0] | {"id": model_id}]
        return authority.sign(EnvelopeType.CONFIG, body)

    async with gateway(settings, port=0) as url, client(url) as api:

        async def listed() -> list[str]:
            return [m.id for m in (await api.models.list()).data]

        seen: list[list[str]] = []

        async def lists(expected: list[str]) -> bool:
            seen.append(await listed())
            return seen[-1] == expected

        assert await listed() == [snapshot.models[0].id]
        # The gateway watches the bucket: each change shows once the watch delivered it.
        # Another network's snapshot and a rolled-back version come between two valid
        # ones; the watch delivers in order, so once the last shows, they were refused.
        await publish_snapshot(nc, bucket, signed(settings.network, 2, "newer"))
        await wait_for(lambda: lists(["newer"]), 10)
        await publish_snapshot(nc, bucket, signed("othernet", 9, "theirs"))
        await publish_snapshot(nc, bucket, signed(settings.network, 1, "rolled-back"))
        await publish_snapshot(nc, bucket, signed(settings.network, 3, "newest"))
        await wait_for(lambda: lists(["newest"]), 10)
        assert ["theirs"] not in seen and ["rolled-back"] not in seen


async def test_a_stream_flood_costs_no_check_for_strangers_or_other_jobs(
    settings: Settings,
    snapshot: Snapshot,
    authority: NodeKey,
    nc: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forged stream messages on a live stream's subject (a stranger's key) and an admitted
    node's messages for jobs nobody waits for are dropped unverified: the only signatures
    checked are the live job's own two parts and its result."""
    honest, stranger = NodeKey.generate(), NodeKey.generate()
    await admit(nc, settings, authority, honest)
    spec = snapshot.models[0]
    model = {"id": spec.id, "version": spec.version, "sha256": spec.sha256}
    checks: Verifications | None = None

    async def nodes() -> None:
        nonlocal checks
        job, data = await take_job(nc, settings, spec.id)
        job_id, subject = job["job_id"], settings.subject("stream", job["job_id"])
        checks = Verifications(monkeypatch)
        for i in range(FLOOD):
            await nc.publish(subject, stream_part(stranger, settings, job_id, i, "x" * 4096))
            other = settings.subject("stream", f"job-o{i}")
            await nc.publish(other, stream_part(honest, settings, f"job-o{i}", 0, "y" * 4096))
        await nc.publish(subject, stream_part(honest, settings, job_id, 0, "Hello"))
        await nc.publish(
            subject, stream_part(honest, settings, job_id, 1, " world", finish_reason="stop")
        )
        honest_result = result(honest, settings, job, data, "Hello world", model)
        await publish_result(nc, settings, job_id, honest_result, job_id)

    async with gateway(settings, port=0) as url, client(url) as api:
        played = asyncio.create_task(nodes())
        stream = await api.completions.create(model=spec.id, prompt="hi", stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        await played
    assert text == "Hello world"
    assert checks is not None and checks.count == 3
