"""The pipeline alone, in this process: jobs/s and this process's CPU per job, no Docker.

N jobs are stored in fresh streams on an embedded nats-server; the timed window runs from
opening the real `Pipeline` (with the real `Publisher`) until the N-th job's result is
stored. `--runtime instant` answers each request on the next loop turn (what is measured
is the pipeline, intake to ack); `--runtime process` is the real supervisor over the echo
engine in a local process. A quick before/after check of a change to `worker/jobs/`, with
each tree alternated in its own process (ABBA):

    for tree in /tmp/before . . /tmp/before; do
        PYTHONPATH=$tree python -m bench.pipeline --jobs 4000; done

This is not one of `python -m bench`'s rows (the agent's row there runs the runtime in a
container); it is for a change whose cost is on the agent's side.
"""

import argparse
import asyncio
import json
import time
from typing import Any

from bench.common import connected, drop_streams, embedded_nats, fill_jobs, fresh_streams
from bench.consumers import SERVING, Counter, CountingMetrics
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, PartialSink, Runtime, RuntimeFacts, WorkItem


class InstantRuntime:
    """Answers every request on the next loop turn: 8 tokens, no process."""

    facts = RuntimeFacts("echo", "bench", "0" * 64, "cpu", "sha256:" + "1" * 64, 128)

    def submit(
        self, item: WorkItem, on_partial: PartialSink | None = None
    ) -> "asyncio.Future[Completion]":
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        ids = list(range(1, 9))
        done = Completion(item.job_id, " ".join(map(str, ids)), ids, "length", 3, 0.001)
        future.get_loop().call_soon(future.set_result, done)
        return future


async def one_run(url: str, prefix: str, runtime: Runtime, n: int) -> dict[str, float]:
    async with connected(url) as nc:
        settings = await fresh_streams(nc, prefix)
        await fill_jobs(nc, settings, n)
        counter = Counter(n)
        publisher = Publisher(nc, nc.jetstream(), NodeKey.generate(), settings)
        pipe = Pipeline(nc, settings, publisher, runtime, SERVING, CountingMetrics(counter))
        t0, cpu0 = time.perf_counter(), time.process_time()
        async with pipe:
            await counter.done.wait()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await drop_streams(nc, settings)
    return {"jobs_per_s": round(n / seconds), "cpu_us_per_job": round(cpu / n * 1e6, 1)}


async def main(kind: str, n: int, reps: int) -> list[dict[str, Any]]:
    out = []
    with embedded_nats() as server:
        for rep in range(reps):
            if kind == "instant":
                out.append(await one_run(server.url, f"p{rep}", InstantRuntime(), n))  # type: ignore[arg-type]
            else:
                from bench.runtime import supervised_echo

                async with supervised_echo("process") as runtime:
                    out.append(await one_run(server.url, f"p{rep}", runtime, n))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=("instant", "process"), default="instant")
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.runtime, args.jobs, args.reps))))  # noqa: T201
