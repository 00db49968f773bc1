"""The runtime: echo frame round trip, cold start vs a bare `docker run`, and a supervised echo
runtime for the pipeline benchmarks."""

import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bench.common import record
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec, Runtime, WorkItem


def _settings(tmp: Path, backend: str) -> Settings:
    return Settings(
        key_file=tmp / "k",
        cache_dir=tmp / "c",
        state_dir=tmp / "s",
        runtime_backend=backend,  # type: ignore[arg-type]
        runtime_memory="2g",
        ping_interval_s=30,
    )


async def echo_launch(tmp: Path, backend: str) -> LaunchSpec:
    from worker.devtools.demomodel import make_echo_model

    model_dir = make_echo_model(tmp / "echo-model")
    if backend == "docker":
        from worker.devtools.images import ensure_image_async

        image = await ensure_image_async("echo")
    else:
        image = "sha256:" + "0" * 64
    return LaunchSpec("echo", image, model_dir, "0" * 64, {})


@asynccontextmanager
async def supervised_echo(kind: str) -> AsyncIterator[Runtime]:
    """The real supervisor around the echo engine: `container` (Docker) or `process`."""
    from worker.runtime.supervisor import Supervisor, create_backend

    backend = "docker" if kind == "container" else "process"
    with tempfile.TemporaryDirectory(prefix="rst-bench-rt-") as tmp:
        settings = _settings(Path(tmp), backend)
        launch = await echo_launch(Path(tmp), backend)
        async with Supervisor(settings, create_backend(settings, node_id="bench"), launch) as sup:
            yield sup


async def round_trip(kind: str, count: int = 2000) -> dict[str, Any]:
    item = WorkItem("rt", {"prompt": "x", "params": {"max_tokens": 8}})
    async with supervised_echo(kind) as runtime:
        for _ in range(100):
            await runtime.run([item])
        samples = []
        for _ in range(count):
            t0 = time.perf_counter()
            await runtime.run([item])
            samples.append(time.perf_counter() - t0)
        batch = [WorkItem(f"b{i}", item.payload) for i in range(32)]
        t0 = time.perf_counter()
        for _ in range(200):
            await runtime.run(batch)
        per_batch32 = (time.perf_counter() - t0) / 200
    figures = {
        "backend": kind,
        "round_trip_median_ms": round(statistics.median(samples) * 1000, 3),
        "round_trip_p99_ms": round(sorted(samples)[int(0.99 * len(samples))] * 1000, 3),
        "batch32_ms": round(per_batch32 * 1000, 3),
    }
    return record(f"echo frame round trip ({kind})", figures, None, "report")


async def cold_start(runs: int = 3) -> dict[str, Any]:
    """Supervisor start (create, isolation check, attach, start, `ready`) vs a bare
    `docker run` of the same image loading the same model until its `ready` frame."""
    from worker.runtime.supervisor import Supervisor, create_backend

    sup_times, bare_times = [], []
    with tempfile.TemporaryDirectory(prefix="rst-bench-cold-") as tmp:
        settings = _settings(Path(tmp), "docker")
        launch = await echo_launch(Path(tmp), "docker")
        for _ in range(runs):
            t0 = time.perf_counter()
            async with Supervisor(settings, create_backend(settings, node_id="bench-cold"), launch):
                sup_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await asyncio.to_thread(_bare_run_until_ready, launch)
            bare_times.append(time.perf_counter() - t0)
    sup, bare = statistics.median(sup_times), statistics.median(bare_times)
    figures = {"supervisor_s": round(sup, 3), "bare_docker_run_s": round(bare, 3)}
    return record(
        "runtime cold start: supervisor vs bare docker run (echo)",
        figures,
        round(bare / sup, 3),
        "report (ratio = bare / supervisor)",
    )


def _bare_run_until_ready(launch: LaunchSpec) -> None:
    proc = subprocess.Popen(
        [
            "docker",
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "-v",
            f"{launch.model_dir}:/model:ro",
            "-e",
            f"RESULTITY_ENGINE={launch.engine}",
            "-e",
            f"RESULTITY_MODEL_SHA256={launch.model_sha256}",
            launch.image,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.read1(1)  # the first byte of the `ready` frame
    proc.kill()
    proc.wait()
