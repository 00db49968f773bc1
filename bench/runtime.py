"""The runtime: echo frame round trip, cold start vs the same Docker API calls made directly
through docker-py, and a supervised echo runtime for the pipeline benchmarks.

    python -m bench.runtime --runs 10
"""

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
from docker.types import Mount

from bench.common import alternated, percentile, record, summary
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec, Runtime, WorkItem
from worker.runtime.container import MODEL_MOUNT, StreamDemux, create_kwargs
from worker.runtime.launch import launch_env


def _settings(tmp: Path, backend: str) -> Settings:
    return Settings(
        key_file=tmp / "k",
        cache_dir=tmp / "c",
        state_dir=tmp / "s",
        runtime_backend=backend,
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
        async with Supervisor(
            settings, create_backend(settings, node_id=f"bench-{os.getpid()}"), launch
        ) as sup:
            yield sup


async def round_trip(kind: str, count: int = 2000, reps: int = 3) -> dict[str, Any]:
    """Echo frame round trip through the supervisor: one request, and 32 at once."""
    item = WorkItem("rt", {"prompt": "x", "params": {"max_tokens": 8}})
    batch = [WorkItem(f"b{i}", item.request) for i in range(32)]
    medians, p99s, per_batch32 = [], [], []
    async with supervised_echo(kind) as runtime:
        for _ in range(100):
            await runtime.run([item])
        for _ in range(reps):
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                await runtime.run([item])
                samples.append(time.perf_counter() - t0)
            medians.append(statistics.median(samples) * 1000)
            p99s.append(percentile(samples, 0.99) * 1000)
            t0 = time.perf_counter()
            for _ in range(200):
                await runtime.run(batch)
            per_batch32.append((time.perf_counter() - t0) / 200 * 1000)
    figures = {
        "backend": kind,
        "round_trip_median_ms": summary(medians),
        "round_trip_p99_ms": summary(p99s),
        "batch32_ms": summary(per_batch32),
    }
    return record(f"echo frame round trip ({kind})", figures, None, "report")


async def cold_start(runs: int = 10) -> dict[str, Any]:
    """To the `ready` frame, in this process: the supervisor (client, leftover check,
    create, inspect and isolation check, attach, start, ready) vs the same Docker API
    sequence made directly through docker-py, (a) with the supervisor's container options
    and no checks, (b) with minimal options (default network: a veth to set up, so slower).
    Alternated ABBA; the paired difference supervisor - (a) is what the supervisor adds."""
    from worker.runtime.supervisor import Supervisor, create_backend

    sides = ("supervisor", "docker_py_same_options", "docker_py_minimal")
    times: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="rst-bench-cold-") as tmp:
        settings = _settings(Path(tmp), "docker")
        launch = await echo_launch(Path(tmp), "docker")
        env = launch_env(launch, settings, model_dir=MODEL_MOUNT)
        for rep, side in alternated(sides, runs):
            if side == "supervisor":
                t0 = time.perf_counter()
                sup = Supervisor(
                    settings, create_backend(settings, node_id=f"bench-cold-{os.getpid()}"), launch
                )
                await sup.__aenter__()
                times[side].append(time.perf_counter() - t0)
                await sup.aclose()
                continue
            if side == "docker_py_same_options":
                kwargs = create_kwargs(
                    launch,
                    settings,
                    node_id=f"bench-cold-{os.getpid()}",
                    name=f"resultity-bench-cold-{os.getpid()}-{rep}",
                    command=None,
                    extra_env={},
                )
            else:
                mount = Mount(target=MODEL_MOUNT, source=str(launch.model_dir), type="bind")
                kwargs = {
                    "image": launch.image,
                    "detach": True,
                    "stdin_open": True,
                    "environment": env,
                    "mounts": [mount],
                }
            seconds, cleanup = await asyncio.to_thread(_docker_py_until_ready, kwargs)
            times[side].append(seconds)
            await asyncio.to_thread(cleanup)
    same = times["docker_py_same_options"]
    added = [(a - b) * 1000 for a, b in zip(times["supervisor"], same, strict=True)]
    figures: dict[str, Any] = {"runs_each": runs}
    figures.update({f"{side}_s": summary(times[side]) for side in sides})
    figures["supervisor_added_ms"] = summary(added, 1)
    return record(
        "runtime cold start to ready: supervisor vs docker-py (echo)",
        figures,
        None,
        "report (added ms, paired with the same options)",
    )


def _docker_py_until_ready(kwargs: dict[str, Any]) -> tuple[float, Callable[[], None]]:
    import docker

    t0 = time.perf_counter()
    client = docker.from_env()
    container = client.containers.create(**kwargs)
    raw = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    sock = getattr(raw, "_sock", raw)
    container.start()
    demux, unpacker = StreamDemux(), msgpack.Unpacker(raw=False)
    frame: Any = None
    while frame is None:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError("container output ended before ready")
        for stream, payload in demux.feed(data):
            if stream == 1:
                unpacker.feed(payload)
                frame = next(iter(unpacker), None)
    seconds = time.perf_counter() - t0
    if frame.get("t") != "ready":
        raise RuntimeError(f"first frame is not ready: {frame!r}")

    def cleanup() -> None:
        raw.close()
        container.remove(force=True, v=True)
        client.close()

    return seconds, cleanup


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="cold starts per side")
    parser.add_argument("--count", type=int, default=2000, help="round trips per repetition")
    args = parser.parse_args()

    async def go() -> list[dict[str, Any]]:
        return [await round_trip("container", args.count), await cold_start(args.runs)]

    print(json.dumps(asyncio.run(go()), indent=2))


if __name__ == "__main__":
    main()
