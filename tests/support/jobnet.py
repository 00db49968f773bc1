"""Test helpers that play the network's side: publish jobs, read back results and events."""

import asyncio
import hashlib
import time
from collections.abc import Iterable
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas.codec import validate
from schemas.event import ErrorEvent
from schemas.result import ResultBody
from worker.core.settings import Settings
from worker.core.signing import verify
from worker.runtime.api import Completion, ItemOutcome, RuntimeFacts, WorkItem


class EchoRuntime:
    """A runtime at the seam the project owns: deterministic outputs, no process."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self._facts = RuntimeFacts("echo", "test", "0" * 64, "cpu", "sha256:" + "1" * 64)

    @property
    def facts(self) -> RuntimeFacts:
        return self._facts

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        self.batches.append(len(items))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out: list[ItemOutcome] = []
        for item in items:
            digest = hashlib.sha256(msgpack.packb(item.payload)).digest()
            ids = list(digest[:8])
            out.append(Completion(item.job_id, bytes(ids).hex(), ids, "length", 3))
        return out


def job(job_id: str, model: str = "demo", **extra: Any) -> bytes:
    body: dict[str, Any] = {"job_id": job_id, "model_id": model, "prompt": f"hello {job_id}"}
    body.update(extra)
    return msgpack.packb(body)


async def publish_job(
    js: JetStreamContext, settings: Settings, model: str, data: bytes, msg_id: str
) -> None:
    await js.publish(settings.subject("jobs", model), data, headers={"Nats-Msg-Id": msg_id})


async def read_all(js: JetStreamContext, stream: str, subject: str) -> list[bytes]:
    """Every message stored on `subject` in `stream`, via an ephemeral ordered consumer."""
    info = await js.stream_info(stream)
    total = info.state.messages
    if total == 0:
        return []
    sub = await js.subscribe(
        subject, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    out: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                break
            out.append(msg.data)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def results(js: JetStreamContext, settings: Settings) -> list[ResultBody]:
    bodies = []
    for data in await read_all(js, settings.stream("RESULTS"), settings.subject("results", ">")):
        bodies.append(validate(ResultBody, verify(data).body))
    return bodies


async def errors(js: JetStreamContext, settings: Settings) -> list[ErrorEvent]:
    subject = settings.subject("events", "error", ">")
    return [
        validate(ErrorEvent, verify(d).body)
        for d in await read_all(js, settings.stream("EVENTS"), subject)
    ]


def ids(items: Iterable[Any]) -> list[str]:
    return [i.job_id for i in items]


async def queue_empty(nc: Client, settings: Settings) -> bool:
    info = await nc.jetstream().stream_info(settings.stream("JOBS"))
    return info.state.messages == 0
