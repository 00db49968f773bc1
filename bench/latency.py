"""Added latency per job: the agent vs the strong nats-py floor, side by side.

Both consumers (`bench.consumers` strong and agent) run at once, each in its own process,
warm, on their own streams; this process is the driver. Every job is sent to both sides
within microseconds (which side first alternates), and its latency (publish -> the result
seen on a plain subscription) is taken on each side. The added latency of job i is
`agent_i - strong_i`: a paired difference, so what both sides suffer at that instant (the
shared machine, the server) cancels out, which the difference of two p99s does not.

Levels: `serial` (one job at a time on each side) and fixed-rate runs at 25/50/75 % of the
strong floor's jobs/s offered to each side; as both sides run at once, the machine carries
twice that rate plus the driver (`sent_per_s_each_side` shows whether the driver kept
its pace). On a small shared machine the upper levels measure CPU starvation.
Levels alternate over repetitions; each figure is the median and
IQR over repetitions of that level's per-job median (and p99) added latency.

    python -m bench.latency --floor-rate 8000 --seconds 3 --reps 3
"""

import argparse
import asyncio
import json
import time
from collections import defaultdict
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.common import (
    MODEL,
    Child,
    alternated,
    connected,
    drop_streams,
    embedded_nats,
    fresh_streams,
    job_bytes,
    percentile,
    record,
    summary,
)

SIDES = ("strong", "agent")
LEVELS = ("serial", "0.25", "0.5", "0.75")
TARGET = "added p50 < 1 ms, p99 < 5 ms"


class Driver:
    def __init__(self, nc: Client, subjects: dict[str, str]) -> None:
        self._nc = nc
        self._subjects = subjects
        self.sent: dict[str, dict[str, float]] = {s: {} for s in SIDES}
        self.seen: dict[str, dict[str, float]] = {s: {} for s in SIDES}
        self._waiting: dict[tuple[str, str], asyncio.Event] = {}
        self._next = 0
        self.achieved = 0.0

    async def listen(self, side: str, results_subject: str) -> None:
        async def cb(msg: Msg) -> None:
            job_id = msg.subject.rsplit(".", 1)[-1]
            self.seen[side].setdefault(job_id, time.perf_counter())
            event = self._waiting.pop((side, job_id), None)
            if event is not None:
                event.set()

        await self._nc.subscribe(results_subject, cb=cb, pending_msgs_limit=-1)

    async def send(self, i: int) -> str:
        job_id, data = f"j{i}", job_bytes(i)
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        for side in order:
            self.sent[side][job_id] = time.perf_counter()
            await self._nc.publish(self._subjects[side], data, headers={"Nats-Msg-Id": job_id})
        return job_id

    def new_ids(self, count: int) -> range:
        ids = range(self._next, self._next + count)
        self._next += count
        return ids

    async def serial(self, count: int) -> list[str]:
        out = []
        for i in self.new_ids(count):
            events = {s: asyncio.Event() for s in SIDES}
            for side in SIDES:
                self._waiting[(side, f"j{i}")] = events[side]
            out.append(await self.send(i))
            await self._nc.flush()
            for event in events.values():
                await asyncio.wait_for(event.wait(), 30)
        return out

    async def fixed_rate(self, rate: float, seconds: float) -> list[str]:
        count = max(1, int(rate * seconds))
        ids = self.new_ids(count)
        out = []
        t0 = time.perf_counter()
        for k, i in enumerate(ids):
            due = t0 + k / rate
            wait = due - time.perf_counter()
            if wait > 0.0005:
                await asyncio.sleep(wait)
            out.append(await self.send(i))
        elapsed = time.perf_counter() - t0
        self.achieved = count / elapsed if elapsed > 0 and count > 1 else rate
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # noqa: ASYNC110 - waiting for results to arrive
            if all(j in self.seen[s] for s in SIDES for j in out[-50:]):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # stragglers of earlier ids
        return out

    def added(self, ids: list[str]) -> tuple[list[float], dict[str, list[float]], int]:
        """Per-job added latency (ms) of the jobs both sides answered, each side's own
        latencies, and how many jobs a side did not answer in time."""
        diffs, own = [], defaultdict(list)
        missing = 0
        for job_id in ids:
            lat = {}
            for side in SIDES:
                seen = self.seen[side].get(job_id)
                if seen is None:
                    missing += 1
                    break
                lat[side] = (seen - self.sent[side][job_id]) * 1000
            else:
                diffs.append(lat["agent"] - lat["strong"])
                for side in SIDES:
                    own[side].append(lat[side])
        return diffs, own, missing


async def latency(
    url: str, floor_rate: float, seconds: float, reps: int, serial_jobs: int = 300
) -> dict[str, Any]:
    children: dict[str, Child] = {}
    async with connected(url) as nc:
        settings = {side: await fresh_streams(nc, f"lat{side[:3]}") for side in SIDES}
        subjects = {side: settings[side].subject("jobs", MODEL) for side in SIDES}
        driver = Driver(nc, subjects)
        try:
            for side in SIDES:
                prefix = settings[side].subject_prefix
                children[side] = Child("bench.consumers", side, "--url", url, "--prefix", prefix)
                await asyncio.to_thread(children[side].expect, "READY")
                await driver.listen(side, settings[side].subject("results", "*"))
                children[side].send("GO")
            await driver.serial(200)  # warm both sides
            await driver.fixed_rate(floor_rate * 0.25, 1.0)
            per_level: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for _rep, level in alternated(LEVELS, reps):
                got = per_level[level]
                if level == "serial":
                    ids = await driver.serial(serial_jobs)
                else:
                    ids = await driver.fixed_rate(floor_rate * float(level), seconds)
                    got["sent_per_s_each_side"].append(driver.achieved)
                diffs, own, missing = driver.added(ids)
                got["added_p50_ms"].append(percentile(diffs, 0.5))
                got["added_p99_ms"].append(percentile(diffs, 0.99))
                for side in SIDES:
                    got[f"{side}_p50_ms"].append(percentile(own[side], 0.5))
                    got[f"{side}_p99_ms"].append(percentile(own[side], 0.99))
                got["unanswered"].append(missing)
        finally:
            for child in children.values():
                child.send("STOP")
                await asyncio.to_thread(child.close)
            for s in settings.values():
                await drop_streams(nc, s)
    figures: dict[str, Any] = {"floor_jobs_per_s": round(floor_rate), "reps": reps}
    for level in LEVELS:
        name = "serial" if level == "serial" else f"at_{int(float(level) * 100)}pct"
        if level != "serial":
            figures[f"{name}_rate_per_s"] = round(floor_rate * float(level))
        for metric, values in per_level[level].items():
            figures[f"{name}_{metric}"] = summary(values)
    return record("added latency per job: agent vs strong floor (paired)", figures, None, TARGET)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor-rate", type=float, default=8000, help="strong floor jobs/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="per fixed-rate run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--serial-jobs", type=int, default=300)
    args = parser.parse_args()

    async def go() -> dict[str, Any]:
        with embedded_nats() as server:
            return await latency(
                server.url, args.floor_rate, args.seconds, args.reps, args.serial_jobs
            )

    print(json.dumps(asyncio.run(go()), indent=2))


if __name__ == "__main__":
    main()
