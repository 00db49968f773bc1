"""The client side of the contract (`worker.client.submit`) against a real nats-server: what
anyone may publish on the events subject never breaks a waiting client, and a client that
gets its answer leaves no task behind to fail once the connection closes."""

import asyncio
import gc
import logging
import time
from pathlib import Path

import msgpack
import pytest
from nats.aio.client import Client

from worker.client import connect, submit
from worker.core.errors import JobFailed
from worker.core.settings import Settings
from worker.core.signing import write_key_file
from worker.devtools.natsd import NatsServer
from worker.jobs.provision import ensure_streams

pytestmark = pytest.mark.nats


async def test_garbage_on_the_events_subject_is_skipped_and_leaves_no_task_behind(
    nats_server: NatsServer, nc: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(nats_url=nats_server.url, admission_required=False)
    await ensure_streams(nc.jetstream(), settings)
    node = write_key_file(tmp_path / "node.key")
    job_seen: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_job(msg: object) -> None:
        await job_seen.put(msg.data)  # type: ignore[attr-defined]

    watcher = await nc.subscribe(settings.subject("jobs", "m1"), cb=on_job)
    # The client's own connection, closed right after the outcome as `submit` and `dev` do.
    client = await connect(nats_server.url)
    job = {"job_id": "job-garbage", "model_id": "m1", "prompt": "hi", "params": {}}
    waiting = asyncio.create_task(submit(client, settings, job, wait_s=30))
    await asyncio.wait_for(job_seen.get(), 30)  # the client subscribed before it published

    subject = settings.subject("events", "error", node.node_id)
    await nc.publish(subject, b"\xc1 not msgpack")
    await nc.publish(subject, msgpack.packb({"not": "an envelope"}))
    body = {
        "node_id": node.node_id,
        "network": settings.network,
        "code": "BAD_REQUEST",
        "message": "no such thing",
        "retryable": False,
        "at": time.time(),
        "job_id": "job-garbage",
    }
    await nc.publish(subject, node.sign_bytes("error", msgpack.packb(body)))
    with pytest.raises(JobFailed, match="no such thing"):
        await waiting
    await client.close()
    await watcher.unsubscribe()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(3):
            await asyncio.sleep(0)  # let any leftover task run to its end
        gc.collect()
    assert "never retrieved" not in caplog.text, caplog.text
