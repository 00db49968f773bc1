"""Shared pieces of the benchmarks: an embedded nats-server, job publishing, a result record."""

import asyncio
import contextlib
import resource
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.aio.client import Client

from worker.devtools.natsd import NatsServer


@contextlib.contextmanager
def embedded_nats() -> Iterator[NatsServer]:
    with tempfile.TemporaryDirectory(prefix="rst-bench-") as tmp:
        with NatsServer(Path(tmp) / "js") as server:
            yield server


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    try:
        yield nc
    finally:
        await nc.close()


async def publish_jobs(nc: Client, subject: str, n: int, prefix: str, window: int = 512) -> None:
    """Publish `n` small jobs, `window` unacknowledged publishes at a time."""
    js = nc.jetstream()
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with sem:
            job_id = f"{prefix}-{i}"
            data = msgpack.packb(
                {
                    "job_id": job_id,
                    "model_id": subject.rsplit(".", 1)[-1],
                    "prompt": f"bench {i}",
                    "params": {"max_tokens": 8},
                }
            )
            await js.publish(subject, data, headers={"Nats-Msg-Id": job_id})

    await asyncio.gather(*(one(i) for i in range(n)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name: str, figures: dict[str, Any], ratio: float | None, target: str) -> dict[str, Any]:
    return {"name": name, "figures": figures, "ratio": ratio, "target": target}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
