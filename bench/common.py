"""Shared pieces of the benchmarks: an embedded nats-server, jobs, statistics, CPU counters,
and the child-process protocol the contenders speak.

Statistics: every figure is a list of repetitions summarised as its median and IQR
(`summary`); ratios are taken per repetition pair, then summarised the same way.
"""

import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.aio.client import Client

from worker.core.settings import Settings
from worker.devtools.natsd import NatsServer
from worker.jobs.provision import provision

MODEL = "bench"
MAX_TOKENS = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")


# statistics


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, IQR (q3 - q1) and the repetitions themselves."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "iqr": None, "n": 0}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": round(statistics.median(vals), digits),
        "iqr": round(q3 - q1, digits),
        "n": len(vals),
        "runs": [round(v, digits) for v in vals],
    }


def spread_pct(value: dict[str, Any]) -> float | None:
    """A summary's IQR over its median, in percent (None with fewer than two repetitions)."""
    if value.get("n", 0) < 2 or not value["median"]:
        return None
    return round(abs(float(value["iqr"]) / float(value["median"])) * 100, 1)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def alternated(names: Sequence[str], reps: int) -> Iterator[tuple[int, str]]:
    """ABBA...: the order is reversed on every other repetition, so drift over the run
    (thermal, neighbours, a growing server store) lands on every side alike."""
    for rep in range(reps):
        order = list(names) if rep % 2 == 0 else list(reversed(names))
        for name in order:
            yield rep, name


def record(
    name: str, figures: dict[str, Any], ratio: Any, target: str, **extra: Any
) -> dict[str, Any]:
    return {"name": name, "figures": figures, "ratio": ratio, "target": target, **extra}


# CPU and memory counters


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pids_named(*names: str) -> list[int]:
    """Processes whose command name is one of `names` (e.g. dockerd), visible here."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def pids_cpu_s(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_s(pid)
        except OSError:
            continue
    return total


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_status_kb(pid: int | str, field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def container_cpu_s(container_id: str) -> float | None:
    """CPU seconds of a container from its cgroup (v2 or v1 cgroupfs / systemd layouts);
    None when no cgroup file is readable (then the figure is left out, not guessed)."""
    candidates = [
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat",
        f"/sys/fs/cgroup/docker/{container_id}/cpu.stat",
        f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage",
        f"/sys/fs/cgroup/cpuacct/system.slice/docker-{container_id}.scope/cpuacct.usage",
        f"/sys/fs/cgroup/cpu,cpuacct/docker/{container_id}/cpuacct.usage",
    ]
    for path in candidates:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith("cpu.stat"):
            for line in text.splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        else:
            return int(text.strip()) / 1e9
    return None


# NATS


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


def bench_settings(prefix: str, tmp: Path | None = None) -> Settings:
    tmp = tmp or Path(tempfile.gettempdir()) / "rst-bench-settings"
    return Settings(
        subject_prefix=prefix,
        key_file=tmp / "k",
        cache_dir=tmp / "c",
        state_dir=tmp / "s",
        max_in_flight=1024,
        runtime_max_active=128,
        ack_wait_s=60,
    )


def job_bytes(i: int) -> bytes:
    """The i-th job; every contender gets the same bytes."""
    data: bytes = msgpack.packb(
        {
            "job_id": f"j{i}",
            "model_id": MODEL,
            "prompt": f"bench {i}",
            "params": {"max_tokens": MAX_TOKENS},
        }
    )
    return data


async def fill_jobs(nc: Client, settings: Settings, n: int, start: int = 0) -> None:
    """Publish jobs start..start+n-1, every one acknowledged by the stream (untimed setup)."""
    js = nc.jetstream(publish_async_max_pending=4000)
    subject = settings.subject("jobs", MODEL)
    for i in range(start, start + n):
        await js.publish_async(subject, job_bytes(i), headers={"Nats-Msg-Id": f"j{i}"})
    await asyncio.wait_for(js.publish_async_completed(), 120)


async def fresh_streams(nc: Client, prefix: str) -> Settings:
    settings = bench_settings(prefix)
    await provision(nc.jetstream(), settings, [MODEL])
    return settings


async def drop_streams(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    for name in ("JOBS", "RESULTS", "EVENTS"):
        with contextlib.suppress(Exception):
            await js.delete_stream(settings.stream(name))


# child processes: `READY {json}` on stdout, `GO` on stdin, `DONE {json}` on stdout


class Child:
    """A contender or driver in its own Python process, spoken to line by line."""

    def __init__(self, module: str, *args: str) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid

    def expect(
        self, tag: str, timeout: float = 300, other: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """The JSON of the next `tag` line; other lines go to `other` (or are dropped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child {self.proc.args!r} ended (rc={self.proc.wait()})")
            if line.startswith(tag + " "):
                parsed: dict[str, Any] = json.loads(line[len(tag) + 1 :])
                return parsed
            if other is not None:
                other(line)
        raise TimeoutError(f"no {tag} line from {self.proc.args!r}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self, timeout: float = 60) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def say(tag: str, payload: dict[str, Any]) -> None:
    """Child side of the protocol."""
    sys.stdout.write(f"{tag} {json.dumps(payload)}\n")
    sys.stdout.flush()


async def read_line() -> str:
    """Child side: the next stdin line, without blocking the event loop ('' at EOF)."""
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()
