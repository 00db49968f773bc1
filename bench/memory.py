"""The agent's resident memory over a long run.

The agent (`bench.consumers agent`: the real pipeline, supervisor and echo runtime
container) runs in its own process and the producer (`bench.producer`) in another, so
the agent's RSS is its own. This process samples the agent's VmRSS every 100 ms and
reads its VmHWM (the kernel's true peak) at the end; the agent reports its RSS and the
`gc` tracked-object count at checkpoints. One long run (not repeated: it is the trend
over the run that matters): peak, end, and the slope over the second half.

    python -m bench.memory --jobs 300000
"""

import argparse
import asyncio
import json
import threading
import time
from typing import Any

from bench.common import (
    Child,
    connected,
    drop_streams,
    embedded_nats,
    fresh_streams,
    proc_status_kb,
    record,
)

SAMPLE_S = 0.1
TARGET = "flat: slope ~0 MB / 100k jobs, gc objects flat"


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares dy/dx."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


async def memory(url: str, jobs: int, checkpoints: int = 6) -> dict[str, Any]:
    every = max(1, jobs // checkpoints)
    checks: list[dict[str, Any]] = []
    samples: list[tuple[float, float]] = []
    async with connected(url) as nc:
        settings = await fresh_streams(nc, "mem")
        prefix = settings.subject_prefix
        agent = Child(
            "bench.consumers", "agent", "--url", url, "--prefix", prefix, "--jobs", str(jobs),
            "--checkpoint-every", str(every),
        )  # fmt: skip
        try:
            await asyncio.to_thread(agent.expect, "READY")
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(SAMPLE_S):
                    samples.append((time.monotonic(), proc_status_kb(agent.pid, "VmRSS") / 1024))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            agent.send("GO")
            producer = Child(
                "bench.producer", "--url", url, "--prefix", prefix, "--jobs", str(jobs)
            )
            with producer:
                other = lambda line: checks.append(json.loads(line[6:]))  # noqa: E731
                done = await asyncio.to_thread(agent.expect, "DONE", 3600, other)
            peak_kb = proc_status_kb(agent.pid, "VmHWM")
            stop.set()
            sampler.join()
            agent.send("BYE")
        finally:
            await asyncio.to_thread(agent.close)
        await drop_streams(nc, settings)
    start = checks[0]["rss_kb"] / 1024
    # second half of the run, RSS against jobs done (checkpoints, where the count is exact)
    half = [(c["completed"], c["rss_kb"] / 1024) for c in checks if c["completed"] >= jobs // 2]
    figures = {
        "jobs": jobs,
        "seconds": round(done["seconds"], 1),
        "rss_start_mb": round(start, 1),
        "rss_peak_sampled_mb": round(max(s for _, s in samples), 1) if samples else None,
        "vm_hwm_mb": round(peak_kb / 1024, 1),
        "rss_end_mb": round(checks[-1]["rss_kb"] / 1024, 1),
        "slope_mb_per_100k_jobs_second_half": round(slope(half) * 100_000, 2),
        "samples": len(samples),
        "gc_objects_at": {str(c["completed"]): c["gc_objects"] for c in checks},
    }
    return record("agent memory over a long run (own process)", figures, None, TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300_000)
    args = parser.parse_args()

    async def go() -> dict[str, Any]:
        with embedded_nats() as server:
            return await memory(server.url, args.jobs)

    print(json.dumps(asyncio.run(go()), indent=2))


if __name__ == "__main__":
    main()
