"""The job producer in its own process: N jobs into a prefix's JOBS stream, each one
acknowledged by the stream, `publish_async` with a bounded window.

    python -m bench.producer --url URL --prefix P --jobs N
"""

import argparse
import asyncio
import time

from bench.common import bench_settings, connected, fill_jobs, say


async def produce(url: str, prefix: str, n: int) -> None:
    async with connected(url) as nc:
        t0 = time.perf_counter()
        await fill_jobs(nc, bench_settings(prefix), n)
        say("DONE", {"seconds": time.perf_counter() - t0, "jobs": n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--jobs", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(produce(args.url, args.prefix, args.jobs))


if __name__ == "__main__":
    main()
