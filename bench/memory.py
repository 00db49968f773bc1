"""The agent's resident memory over a long run: 100,000 jobs through the pipeline with the
echo runtime, RSS sampled as it goes; reports the peak and the slope of the second half."""

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import connected, embedded_nats, publish_jobs, record
from bench.throughput import MODEL, RuntimeFactory, bench_settings, echo_factory
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per job."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


async def memory(url: str, tmp: Path, jobs: int, factory: RuntimeFactory) -> dict[str, Any]:
    key = NodeKey.generate()
    settings = bench_settings(tmp, "mem")
    samples: list[tuple[int, float]] = []
    chunk = 10_000
    async with connected(url) as nc:
        js = nc.jetstream()
        await provision(js, settings, [MODEL])
        serving = Serving(MODEL, "1", "0" * 64, "sha256:" + "0" * 64, 1)
        async with factory() as runtime:
            async with Pipeline(
                nc, settings, Publisher(nc, js, key, settings), runtime, serving
            ) as pipe:
                started_rss = rss_mb()
                published = 0
                while published < jobs:
                    n = min(chunk, jobs - published)
                    await publish_jobs(nc, settings.subject("jobs", MODEL), n, f"m{published}")
                    published += n
                    while pipe.completed < published:  # noqa: ASYNC110 - polling a counter
                        await asyncio.sleep(0.05)
                    samples.append((pipe.completed, rss_mb()))
                # the stream's dedupe table is the server's memory, not ours; purge results
                await js.purge_stream(settings.stream("RESULTS"))
    second_half = samples[len(samples) // 2 :]
    per_100k = slope(second_half) * 100_000
    figures = {
        "jobs": jobs,
        "rss_start_mb": round(started_rss, 1),
        "rss_peak_mb": round(max(started_rss, *(y for _, y in samples)), 1),
        "rss_end_mb": round(samples[-1][1], 1),
        "slope_mb_per_100k_jobs_second_half": round(per_100k, 2),
    }
    return record("agent memory over a long run", figures, None, "flat: slope ~0 MB / 100k jobs")


async def main_async(jobs: int, kind: str) -> dict[str, Any]:
    with embedded_nats() as server, tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        out = await memory(server.url, Path(tmp), jobs, echo_factory(kind))
        out["figures"]["seconds"] = round(time.monotonic() - started, 1)
        return out


if __name__ == "__main__":
    import json
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(json.dumps(asyncio.run(main_async(n, "container")), indent=2))
