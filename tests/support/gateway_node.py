"""A node played at the NATS seam for the gateway's streaming test: it takes one job, streams
signed partial output (a first attempt, a forged envelope, a second attempt), then publishes
the signed result of the second attempt."""

import hashlib
import time
from typing import Any

import msgpack
from nats.aio.client import Client

from schemas.envelope import EnvelopeType
from schemas.snapshot import ModelSpec
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.provision import consumer_name

FINAL = ("Hello", " world")


async def play_node(nc: Client, settings: Settings, model: ModelSpec) -> str:
    js = nc.jetstream()
    # The network provisioned the model's job consumer (a work queue allows one).
    sub = await js.pull_subscribe_bind(
        consumer_name(settings, model.id), stream=settings.stream("JOBS")
    )
    [msg] = await sub.fetch(1, timeout=30)
    job = msgpack.unpackb(msg.data)
    job_id = job["job_id"]
    key, forger = NodeKey.generate(), NodeKey.generate()
    subject = settings.subject("stream", job_id)

    def part(attempt: int, seq: int, text: str, **extra: Any) -> dict[str, Any]:
        body = {"job_id": job_id, "node_id": key.node_id, "network": settings.network}
        body |= {"attempt": attempt, "seq": seq}
        return body | {"token_ids": [seq], "text": text, **extra}

    await nc.publish(subject, key.sign("stream", part(1, 0, "Hel")))
    await nc.publish(subject, forger.sign("stream", part(1, 1, "forged")))
    await nc.publish(subject, key.sign("stream", part(2, 0, FINAL[0])))
    await nc.publish(subject, key.sign("stream", part(2, 1, FINAL[1], finish_reason="stop")))
    await nc.flush()
    now = time.time()
    body = {
        "job_id": job_id,
        "node_id": key.node_id,
        "network": settings.network,
        "model": {"id": model.id, "version": model.version, "sha256": model.sha256},
        "runtime": {"image": "sha256:" + "1" * 64, "engine": "echo", "engine_version": "t",
                    "device": "cpu"},
        "config_version": 1,
        "input_sha256": hashlib.sha256(msg.data).hexdigest(),
        "output": {"text": "".join(FINAL), "token_ids": [0, 1], "finish_reason": "stop"},
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "attempt": 2,
        "started_at": now,
        "finished_at": now,
    }  # fmt: skip
    await js.publish(
        settings.subject("results", job_id),
        key.sign(EnvelopeType.RESULT, body),
        headers={"Nats-Msg-Id": job_id},
    )
    await msg.ack()
    return "".join(FINAL)
