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
from worker.runtime.api import (
    Completion,
    ItemOutcome,
    Partial,
    PartialSink,
    RuntimeFacts,
    WorkItem,
    submit_in_task,
)


class EchoRuntime:
    """A runtime at the seam the project owns: deterministic outputs, no process.

    `delay_s` holds each request that long; `token_delay_s` streams one token per delay to
    a streaming request. `calls` counts requests, `peak` the most that ran at once,
    `cancelled` the job ids whose request was cancelled (aborted)."""

    def __init__(self, delay_s: float = 0.0, token_delay_s: float = 0.0, tokens: int = 8) -> None:
        self.delay_s = delay_s
        self.token_delay_s = token_delay_s
        self.tokens = tokens
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.cancelled: list[str] = []
        self.started = asyncio.Event()
        self._facts = RuntimeFacts("echo", "test", "0" * 64, "cpu", "sha256:" + "1" * 64, 8)

    @property
    def facts(self) -> RuntimeFacts:
        return self._facts

    def answer(self, item: WorkItem) -> Completion:
        digest = hashlib.sha256(msgpack.packb(item.request)).digest()
        ids = list(digest[: self.tokens])
        return Completion(item.job_id, " ".join(map(str, ids)), ids, "length", 3, 0.001)

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.set()
        try:
            done = self.answer(item)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if on_partial is not None:
                for i, t in enumerate(done.token_ids[:-1]):
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    on_partial(Partial([t], (" " if i else "") + str(t)))
            return done
        except asyncio.CancelledError:
            self.cancelled.append(item.job_id)
            raise
        finally:
            self.active -= 1

    def submit(
        self, item: WorkItem, on_partial: PartialSink | None = None
    ) -> "asyncio.Future[Completion]":
        return submit_in_task(self, item, on_partial)

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        return [await self.generate(i) for i in items]


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
