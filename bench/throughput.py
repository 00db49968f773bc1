"""Jobs/s and added latency: the agent's pipeline vs a minimal nats-py loop (the floor).

Both run in one process against one embedded nats-server, on the same jobs:
- floor: fetch 256, sign each result, publish them concurrently, ack each;
- agent: the real `Pipeline` (intake, a request per job, runtime, signing, publish, ack) with the
  echo engine, in a real container when Docker answers (`--runtime container`).
Latency is measured at low load, one job at a time: publish -> result stored and seen.
"""

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench.common import connected, embedded_nats, percentile, publish_jobs, record
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import consumer_name, provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import Runtime

MODEL = "bench"
RuntimeFactory = Callable[[], AbstractAsyncContextManager[Runtime]]


def bench_settings(tmp: Path, prefix: str) -> Settings:
    return Settings(
        subject_prefix=prefix,
        key_file=tmp / "k",
        cache_dir=tmp / "c",
        state_dir=tmp / "s",
        max_in_flight=1024,
        runtime_max_active=128,
        ack_wait_s=60,
    )


async def floor_loop(nc: Client, settings: Settings, n: int, key: NodeKey) -> None:
    js = nc.jetstream()
    psub = await js.pull_subscribe(
        settings.subject("jobs", MODEL),
        durable=consumer_name(settings, MODEL),
        stream=settings.stream("JOBS"),
    )
    done = 0
    while done < n:
        try:
            msgs = await psub.fetch(256, timeout=1)
        except TimeoutError:
            continue

        async def one(msg: Any) -> None:
            job = msgpack.unpackb(msg.data)
            body = msgpack.packb({"job_id": job["job_id"], "node_id": key.node_id, "out": [1, 2]})
            await js.publish(
                settings.subject("results", job["job_id"]),
                key.sign_bytes("result", body),
                headers={"Nats-Msg-Id": job["job_id"]},
            )
            await msg.ack()

        await asyncio.gather(*(one(m) for m in msgs))
        done += len(msgs)
    await psub.unsubscribe()


async def run_pipeline_until(
    nc: Client, settings: Settings, runtime: Runtime, key: NodeKey, n: int
) -> None:
    js = nc.jetstream()
    serving = Serving(MODEL, "1", "0" * 64, "sha256:" + "0" * 64, 1)
    async with Pipeline(nc, settings, Publisher(nc, js, key, settings), runtime, serving) as pipe:
        while pipe.completed < n:  # noqa: ASYNC110 - polling a counter, not an event
            await asyncio.sleep(0.005)


async def throughput(
    url: str, tmp: Path, n: int, runtime_factory: RuntimeFactory
) -> dict[str, Any]:
    key = NodeKey.generate()
    figures: dict[str, Any] = {"jobs": n}
    async with connected(url) as nc:
        for which in ("floor", "agent"):
            settings = bench_settings(tmp, f"b{which}")
            await provision(nc.jetstream(), settings, [MODEL])
            await publish_jobs(nc, settings.subject("jobs", MODEL), n, which)
            started = time.perf_counter()
            if which == "floor":
                await floor_loop(nc, settings, n, key)
            else:
                async with runtime_factory() as runtime:
                    started = time.perf_counter()
                    await run_pipeline_until(nc, settings, runtime, key, n)
            figures[f"{which}_jobs_per_s"] = round(n / (time.perf_counter() - started))
    ratio = figures["agent_jobs_per_s"] / figures["floor_jobs_per_s"]
    return record("throughput: agent vs raw nats-py loop", figures, round(ratio, 3), ">= 0.5")


async def _latencies(nc: Client, settings: Settings, count: int, tag: str) -> list[float]:
    js = nc.jetstream()
    sub = await js.subscribe(
        settings.subject("results", ">"), config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    )
    out = []
    for i in range(count):
        job_id = f"{tag}-lat-{i}"
        data = msgpack.packb(
            {"job_id": job_id, "model_id": MODEL, "prompt": "x", "params": {"max_tokens": 8}}
        )
        t0 = time.perf_counter()
        await js.publish(settings.subject("jobs", MODEL), data, headers={"Nats-Msg-Id": job_id})
        msg = await sub.next_msg(timeout=10)
        out.append(time.perf_counter() - t0)
        await msg.ack()
    await sub.unsubscribe()
    return out


async def latency(
    url: str, tmp: Path, count: int, runtime_factory: RuntimeFactory
) -> dict[str, Any]:
    key = NodeKey.generate()
    figures: dict[str, Any] = {"jobs": count}
    async with connected(url) as nc:
        settings = bench_settings(tmp, "lfloor")
        await provision(nc.jetstream(), settings, [MODEL])
        loop = asyncio.create_task(_floor_forever(nc, settings, key))
        floor = await _latencies(nc, settings, count, "floor")
        loop.cancel()
        settings = bench_settings(tmp, "lagent")
        await provision(nc.jetstream(), settings, [MODEL])
        async with runtime_factory() as runtime:
            js = nc.jetstream()
            serving = Serving(MODEL, "1", "0" * 64, "sha256:" + "0" * 64, 1)
            publisher = Publisher(nc, js, key, settings)
            async with Pipeline(nc, settings, publisher, runtime, serving):
                await _latencies(nc, settings, 20, "warm")
                agent = await _latencies(nc, settings, count, "agent")
    for name, values in (("floor", floor), ("agent", agent)):
        figures[f"{name}_p50_ms"] = round(percentile(values, 0.5) * 1000, 3)
        figures[f"{name}_p99_ms"] = round(percentile(values, 0.99) * 1000, 3)
    figures["added_p50_ms"] = round(figures["agent_p50_ms"] - figures["floor_p50_ms"], 3)
    figures["added_p99_ms"] = round(figures["agent_p99_ms"] - figures["floor_p99_ms"], 3)
    return record("added latency at low load", figures, None, "p50 < 1 ms, p99 < 5 ms")


async def _floor_forever(nc: Client, settings: Settings, key: NodeKey) -> None:
    await floor_loop(nc, settings, 1 << 62, key)


def echo_factory(kind: str) -> RuntimeFactory:
    """`container`: the supervisor with the echo image; `seam`: the in-process test runtime."""

    @asynccontextmanager
    async def seam() -> AsyncIterator[Runtime]:
        from tests.jobnet import EchoRuntime

        yield EchoRuntime()

    if kind == "seam":
        return seam
    from bench.runtime import supervised_echo

    return lambda: supervised_echo(kind)


async def main_async(n: int, lat: int, kind: str) -> list[dict[str, Any]]:
    import tempfile

    with embedded_nats() as server, tempfile.TemporaryDirectory() as tmp:
        factory = echo_factory(kind)
        out = [await throughput(server.url, Path(tmp), n, factory)]
        out.append(await latency(server.url, Path(tmp), lat, factory))
        for rec in out:
            rec["figures"]["runtime"] = kind
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--runtime", choices=["container", "process", "seam"], default="container")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args.jobs, args.latency_jobs, args.runtime)), indent=2))


if __name__ == "__main__":
    main()
