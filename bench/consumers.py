"""The throughput contenders, each run as its own process by `bench.throughput` and
`bench.latency`:

    strong      raw nats-py at its best: a standing pull credit of 1024 on the durable
                consumer with callback delivery, `publish_async` (no await per PubAck), the
                job acked when its PubAck lands; Ed25519-signed result of the agent's size
    matched     strong + the agent's per-job work outside the runtime: `admit` (schema
                decode, checks, input hash), the runtime payload and the same result body
    faststream  FastStream's JetStream pull subscriber with batches, the result published
                with `Nats-Msg-Id` (PubAck awaited), then a manual ack: the peer a Python
                user would pick
    agent       the real `Pipeline` with the supervisor and the echo runtime container

    python -m bench.consumers KIND --url URL --prefix P --jobs N

Protocol with the parent (`bench.common.Child`): the child connects and starts what it
needs (the agent: its runtime container), prints `READY {...}`, waits for `GO`, consumes
until N results are stored and their jobs acked (N = 0: until `STOP`), and prints
`DONE {"seconds", "cpu_s", ...}` where cpu_s is its own CPU time over the same window.
Every contender takes the node's garbage-collector settings (`tune_for_serving`, as
`resultity-node run` does once started) before `READY`: the floors get what the agent gets.
"""

import argparse
import asyncio
import functools
import gc
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.common import (
    MODEL,
    bench_settings,
    connected,
    proc_status_kb,
    read_line,
    say,
    self_cpu_s,
)
from containers.runtime.engines.echo import render
from schemas.envelope import EnvelopeType
from worker.core.gcpolicy import tune_for_serving
from worker.core.metrics import Metrics
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.intake import InFlight, admit
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import consumer_name
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, RuntimeFacts

KINDS = ("strong", "matched", "faststream", "agent")
CREDIT = 1024
MIN_PULL = 64
FASTSTREAM_BATCH = 256
SERVING = Serving(MODEL, "1", "0" * 64, "sha256:" + "0" * 64, 1)
ECHO_FACTS = RuntimeFacts("echo", "echo-1", "0" * 64, "cpu", SERVING.image)
_IDS = [(i * 7919 + 13) % 50000 for i in range(8)]
SAMPLE = Completion("", " ".join(render(_IDS)), _IDS, "length", 7)


class Counter:
    """Jobs finished (result stored, job acked); `done` is set at the target."""

    def __init__(self, target: int, checkpoint_every: int = 0) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()
        self._every = checkpoint_every
        self._next_check = checkpoint_every

    def add(self, k: int) -> None:
        self.count += k
        if self._every and self.count >= self._next_check:
            self._next_check += self._every
            checkpoint(self.count)
        if self.target and self.count >= self.target:
            self.done.set()


def checkpoint(completed: int) -> None:
    """`CHECK {...}`: the process's RSS and what the garbage collector tracks, now."""
    say(
        "CHECK",
        {
            "completed": completed,
            "rss_kb": proc_status_kb("self", "VmRSS"),
            "gc_objects": len(gc.get_objects()),
            "gc_counts": list(gc.get_count()),
        },
    )


# the agent's per-job work, mirrored for the matched floor


def result_body(
    record: InFlight,
    done: Completion,
    node_id: str,
    network: str,
    started: float,
    finished: float,
) -> dict[str, Any]:
    """The same map the agent signs (`Pipeline._result_fields` with the node's identity
    and attestation; keep in step with it)."""
    assert record.job is not None
    return {
        "job_id": record.job.job_id,
        "node_id": node_id,
        "network": network,
        "model": {"id": SERVING.model_id, "version": SERVING.model_version, "sha256": "0" * 64},
        "runtime": {
            "image": SERVING.image,
            "engine": ECHO_FACTS.engine,
            "engine_version": ECHO_FACTS.engine_version,
            "device": ECHO_FACTS.device,
        },
        "config_version": SERVING.config_version,
        "input_sha256": record.input_sha256,
        "output": {
            "text": done.text,
            "token_ids": done.token_ids,
            "finish_reason": done.finish_reason,
        },
        "usage": {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": len(done.token_ids),
            "first_token_s": done.first_token_s,
        },
        "attempt": record.attempt,
        "started_at": started,
        "finished_at": finished,
    }


def agent_result_size(key: NodeKey, network: str) -> int:
    """Bytes of a typical signed result of the agent (what the strong floor pads to)."""
    body = {
        "job_id": "j100000",
        "node_id": key.node_id,
        "network": network,
        "model": {"id": MODEL, "version": "1", "sha256": "0" * 64},
        "runtime": {
            "image": SERVING.image,
            "engine": "echo",
            "engine_version": "echo-1",
            "device": "cpu",
        },
        "config_version": 1,
        "input_sha256": "0" * 64,
        "output": {"text": SAMPLE.text, "token_ids": SAMPLE.token_ids, "finish_reason": "length"},
        "usage": {"prompt_tokens": 7, "completion_tokens": 8, "first_token_s": 1e-4},
        "attempt": 1,
        "started_at": time.time(),
        "finished_at": time.time(),
    }
    return len(key.sign_bytes(EnvelopeType.RESULT, msgpack.packb(body)))


def padded_body(job_id: str, node_id: str, size: int) -> bytes:
    """A msgpack body whose signed envelope is `size` bytes for a 7-character job id."""
    return msgpack.packb({"job_id": job_id, "node_id": node_id, "pad": b"\0" * size})  # type: ignore[no-any-return]


def pad_for(key: NodeKey, target: int) -> int:
    pad = 0
    for _ in range(3):
        got = len(key.sign_bytes(EnvelopeType.RESULT, padded_body("j100000", key.node_id, pad)))
        pad = max(0, pad + target - got)
    return pad


# the standing pull credit


class StandingPull:
    """Pull requests kept outstanding on one durable consumer up to `credit`, delivered
    to a subscription callback; `settled(k)` gives k credits back."""

    def __init__(
        self, nc: Client, settings: Settings, on_job: Callable[[Msg], Awaitable[None]]
    ) -> None:
        self._nc = nc
        self._api = (
            f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream('JOBS')}.{consumer_name(settings, MODEL)}"
        )
        self._inbox = nc.new_inbox()
        self._on_job = on_job
        self._free = CREDIT

    async def start(self) -> None:
        await self._nc.subscribe(self._inbox, cb=self._deliver, pending_msgs_limit=-1)
        await self._request()

    async def _request(self) -> None:
        want, self._free = self._free, 0
        request = {"batch": want, "expires": int(30e9)}
        await self._nc.publish(self._api, json.dumps(request).encode(), reply=self._inbox)

    async def settled(self, k: int) -> None:
        self._free += k
        if self._free >= MIN_PULL:
            await self._request()

    async def _deliver(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status"):
            pending = msg.headers.get("Nats-Pending-Messages")
            if pending is not None:  # an expired request: ask again for what it had left
                await self.settled(int(pending))
            return
        await self._on_job(msg)


class AckOnPubAck:
    """Acks each job when its result's PubAck lands, in bulk from one task."""

    def __init__(self, pull: "StandingPull | None", counter: Counter) -> None:
        self.pull = pull
        self._counter = counter
        self._ready: list[Msg] = []
        self._wake = asyncio.Event()

    def landed(self, msg: Msg, fut: "asyncio.Future[Any]") -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # not acked: redelivered after ack_wait (none happen in the benchmark)
        self._ready.append(msg)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ready, self._ready = self._ready, []
            for msg in ready:
                await msg.ack()
            self._counter.add(len(ready))
            if self.pull is not None:
                await self.pull.settled(len(ready))


async def raw_floor(
    nc: Client, settings: Settings, key: NodeKey, counter: Counter, matched: bool
) -> Callable[[], Awaitable[None]]:
    js = nc.jetstream(publish_async_max_pending=4 * CREDIT)
    results = settings.subject("results")
    node_id = key.node_id
    pad = pad_for(key, agent_result_size(key, settings.network))
    acker = AckOnPubAck(None, counter)

    async def strong(msg: Msg) -> None:
        job_id = msgpack.unpackb(msg.data)["job_id"]
        envelope = key.sign_bytes(EnvelopeType.RESULT, padded_body(job_id, node_id, pad))
        fut = await js.publish_async(
            f"{results}.{job_id}", envelope, headers={"Nats-Msg-Id": job_id}
        )
        fut.add_done_callback(functools.partial(acker.landed, msg))

    async def with_agent_work(msg: Msg) -> None:
        record, rejection = admit(
            msg, model_id=MODEL, max_bytes=settings.max_job_bytes, now=time.time()
        )
        if rejection is not None or record.job is None:
            await msg.term()
            return
        record.job.request_item()
        now = time.time()
        done = Completion(record.job.job_id, SAMPLE.text, SAMPLE.token_ids, "length", 7)
        body = result_body(record, done, node_id, settings.network, now, now)
        envelope = key.sign_bytes(EnvelopeType.RESULT, msgpack.packb(body))
        job_id = record.job.job_id
        fut = await js.publish_async(
            f"{results}.{job_id}", envelope, headers={"Nats-Msg-Id": job_id}
        )
        fut.add_done_callback(functools.partial(acker.landed, msg))

    pull = StandingPull(nc, settings, with_agent_work if matched else strong)
    acker.pull = pull

    async def go() -> None:
        asyncio.get_running_loop().create_task(acker.run())
        await pull.start()

    return go


async def faststream_peer(
    url: str, settings: Settings, key: NodeKey, counter: Counter
) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    from faststream import AckPolicy, Context
    from faststream.nats import JStream, NatsBroker, PullSub
    from faststream.nats.message import NatsBatchMessage

    broker = NatsBroker(url, logger=None)
    results = settings.subject("results")
    results_stream = settings.stream("RESULTS")
    pad = pad_for(key, agent_result_size(key, settings.network))

    async def one(raw: Msg) -> None:
        job_id = msgpack.unpackb(raw.data)["job_id"]
        envelope = key.sign_bytes(EnvelopeType.RESULT, padded_body(job_id, key.node_id, pad))
        await broker.publish(
            envelope, f"{results}.{job_id}", headers={"Nats-Msg-Id": job_id}, stream=results_stream
        )

    @broker.subscriber(
        settings.subject("jobs", MODEL),
        stream=JStream(settings.stream("JOBS"), declare=False),
        durable=consumer_name(settings, MODEL),
        pull_sub=PullSub(batch_size=FASTSTREAM_BATCH, timeout=0.05, batch=True),
        ack_policy=AckPolicy.MANUAL,
    )
    async def handle(bodies: list[bytes], msg: NatsBatchMessage = Context("message")) -> None:  # noqa: B008
        await asyncio.gather(*(one(raw) for raw in msg.raw_message))
        await msg.ack()
        counter.add(len(msg.raw_message))

    await broker.connect()
    return broker.start, broker.stop


class CountingMetrics(Metrics):
    """The agent's metrics, counting each job that succeeded (its result stored, its ack on
    the way) into the bench's counter: the end of the timed window, without a callback of
    its own per job."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._succeeded = 0
        super().__init__()

    @property  # type: ignore[override]
    def jobs_succeeded(self) -> int:
        return self._succeeded

    @jobs_succeeded.setter
    def jobs_succeeded(self, value: int) -> None:
        if value > self._succeeded:
            self._counter.add(value - self._succeeded)
        self._succeeded = value


async def serve(args: argparse.Namespace) -> None:
    settings = bench_settings(args.prefix)
    key = NodeKey.generate()
    counter = Counter(args.jobs, args.checkpoint_every)
    ready: dict[str, Any] = {"pid": __import__("os").getpid()}
    async with connected(args.url) as nc:
        stop: Callable[[], Awaitable[None]] | None = None
        if args.kind in ("strong", "matched"):
            go = await raw_floor(nc, settings, key, counter, matched=args.kind == "matched")
            await _run(args, ready, go, counter)
        elif args.kind == "faststream":
            go, stop = await faststream_peer(args.url, settings, key, counter)
            await _run(args, ready, go, counter)
            await stop()
        else:
            from bench.runtime import supervised_echo

            async with supervised_echo("container") as runtime:
                ready["container_id"] = runtime.stats().runtime_id  # type: ignore[attr-defined]
                publisher = Publisher(nc, nc.jetstream(), key, settings)
                metrics = CountingMetrics(counter)
                pipe = Pipeline(nc, settings, publisher, runtime, SERVING, metrics)

                async def go_agent() -> None:
                    await pipe.__aenter__()

                try:
                    await _run(args, ready, go_agent, counter)
                finally:
                    await pipe.drain(5)  # a drain leaves the pipeline open, paused
                    await pipe.aclose()


async def _run(
    args: argparse.Namespace,
    ready: dict[str, Any],
    go: Callable[[], Awaitable[None]],
    counter: Counter,
) -> None:
    tune_for_serving()
    say("READY", ready)
    if await read_line() != "GO":
        return
    if args.checkpoint_every:
        checkpoint(0)
    cpu0, t0 = self_cpu_s(), time.perf_counter()
    await go()
    if counter.target:
        await counter.done.wait()
    else:
        await read_line()  # STOP
    seconds, cpu = time.perf_counter() - t0, self_cpu_s() - cpu0
    if counter.target and args.checkpoint_every:
        checkpoint(counter.count)
    say("DONE", {"seconds": seconds, "cpu_s": cpu, "jobs": counter.count})
    if counter.target:
        await read_line()  # the parent has read its counters; now shut down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--jobs", type=int, default=0, help="0: serve until STOP")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="CHECK lines (jobs)")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
