"""Signed messages as an honest node or a stranger publishes them, for the trust tests:
results, stream messages and error events for a job taken off the queue."""

import hashlib
import time
from typing import Any

import msgpack
from nats.aio.client import Client

from schemas.envelope import EnvelopeType
from worker.core.registry import publish_record, sign_admission, sign_revocation
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.provision import consumer_name

MODEL = {"id": "m1", "version": "1", "sha256": "ab" * 32}


async def admit(nc: Client, settings: Settings, authority: NodeKey, node: NodeKey) -> None:
    record = sign_admission(authority, node.node_id, settings.network)
    await publish_record(nc, settings, node.node_id, record)


async def revoke(nc: Client, settings: Settings, authority: NodeKey, node: NodeKey) -> None:
    await publish_record(
        nc, settings, node.node_id, sign_revocation(authority, node.node_id, settings.network)
    )


async def take_job(nc: Client, settings: Settings, model_id: str) -> tuple[dict[str, Any], bytes]:
    """The next job of `model_id`'s consumer (provisioned by the network), acked."""
    sub = await nc.jetstream().pull_subscribe_bind(
        consumer_name(settings, model_id), stream=settings.stream("JOBS")
    )
    [msg] = await sub.fetch(1, timeout=30)
    await msg.ack()
    await sub.unsubscribe()
    return msgpack.unpackb(msg.data), msg.data


def result(
    key: NodeKey,
    settings: Settings,
    job: dict[str, Any],
    data: bytes,
    text: str,
    model: dict[str, str] | None = None,
) -> bytes:
    now = time.time()
    body = {
        "job_id": job["job_id"],
        "node_id": key.node_id,
        "network": settings.network,
        "model": model or MODEL,
        "runtime": {"image": "sha256:" + "1" * 64, "engine": "echo", "engine_version": "t",
                    "device": "cpu"},
        "config_version": 1,
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "output": {"text": text, "token_ids": [1], "finish_reason": "stop"},
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        "attempt": 1,
        "started_at": now,
        "finished_at": now,
    }  # fmt: skip
    return key.sign(EnvelopeType.RESULT, body)


def stream_part(
    key: NodeKey, settings: Settings, job_id: str, seq: int, text: str, **extra: Any
) -> bytes:
    body = {"job_id": job_id, "node_id": key.node_id, "network": settings.network}
    body |= {"attempt": 1, "seq": seq, "token_ids": [seq], "text": text, **extra}
    return key.sign(EnvelopeType.STREAM, body)


async def publish_result(
    nc: Client, settings: Settings, job_id: str, envelope: bytes, msg_id: str
) -> None:
    await nc.jetstream().publish(
        settings.subject("results", job_id), envelope, headers={"Nats-Msg-Id": msg_id}
    )
