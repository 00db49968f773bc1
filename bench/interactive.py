"""Interactive inference through the whole node (NATS, pipeline, supervisor, hardened
container) next to vLLM's own engine loop in the same image, on the tiny demo model:

- mixed workload: 128 jobs at once, 80 % `max_tokens` 16, 20 % 224, greedy; node tokens/s
  and the median completion time of the short jobs, against the engine loop fed all 128
  requests at once (targets: tokens/s >= 0.9 of the baseline, short-job median <= 1.5x);
- uniform workload: 64 jobs x 64 tokens (target: tokens/s >= 0.95 of the baseline);
- streaming: job publish -> first `stream` message on NATS, p50/p99, next to the engine's
  own `usage.first_token_s` (target: the node adds <= 20 ms p50);
- cancel: cancel publish -> `CANCELLED` error event, p50/p99 (target: p99 <= 200 ms).

The node and the engine loop take turns (ABBA, `--reps` repetitions, 5 by default): the
node stays up, the engine loop is a fresh container each turn (vLLM loaded, each workload
warmed up once, then timed; the node's runtime stays loaded meanwhile, idle: about 1 % of
a core); throughput figures and ratios are the median and IQR over
the repetitions, each ratio taken within its repetition. `python -m bench.interactive
--small` runs each at a reduced size, once (a smoke run).
"""

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.common import alternated, connected, embedded_nats, percentile, record, summary
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import LaunchSpec

log = logging.getLogger("bench.interactive")

MODEL = "tiny"
SHORT, LONG = 16, 224


@dataclass
class Node:
    nc: Client
    settings: Settings


def mixed_requests(n: int) -> list[tuple[str, int]]:
    """n requests, every fifth one long: 80 % short, 20 % long, interleaved."""
    return [(f"Job {i} says", LONG if i % 5 == 4 else SHORT) for i in range(n)]


def uniform_requests(n: int, tokens: int) -> list[tuple[str, int]]:
    return [(f"Prompt number {i} asks the node", tokens) for i in range(n)]


def engine_loop(
    image: str, model_dir: Path, workloads: list[list[tuple[str, int]]]
) -> list[list[tuple[int, float]]]:
    """The baseline: vLLM's engine loop in the same image, each workload's requests all at
    once; per workload, per request, its tokens and seconds to its completion."""
    script = Path(__file__).with_name("vllm_engine_loop.py")
    command = ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp"]
    command += ["--shm-size", "512m", "--user", "65534:65534", "-v", f"{model_dir}:/model:ro"]
    command += ["-v", f"{script}:/bench/vllm_engine_loop.py:ro", "--entrypoint", "python3"]
    command += [image, "/bench/vllm_engine_loop.py", json.dumps([workloads, 2])]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1200)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    reported = json.loads(line.removeprefix("RESULT "))
    return [[(int(t), float(s)) for t, s in runs] for runs in reported]


@asynccontextmanager
async def node(engine: str, image: str, model_dir: Path, sha: str) -> AsyncIterator[Node]:
    from worker.runtime.supervisor import Supervisor, create_backend

    with embedded_nats() as server, tempfile.TemporaryDirectory(prefix="rst-bench-i-") as tmp:
        settings = Settings(
            key_file=Path(tmp) / "k",
            cache_dir=Path(tmp) / "c",
            state_dir=Path(tmp) / "s",
            runtime_backend="docker",
            runtime_memory="6g",
            request_timeout_s=600,
            ack_wait_s=120,
            max_in_flight=512,
            ping_interval_s=30,
        )
        key = NodeKey.generate()
        args = {"token_delay_ms": 2} if engine == "echo" else {}
        launch = LaunchSpec(engine, image, model_dir, sha, args)
        async with connected(server.url) as nc:
            js = nc.jetstream()
            await provision(js, settings, [MODEL])
            backend = create_backend(settings, node_id="bench-interactive")
            serving = Serving(MODEL, "1", sha, image, 1)
            async with (
                Supervisor(settings, backend, launch) as sup,
                Pipeline(nc, settings, Publisher(nc, js, key, settings), sup, serving),
            ):
                yield Node(nc, settings)


async def publish(node: Node, job_id: str, prompt: str, max_tokens: int, **extra: Any) -> None:
    body = {"job_id": job_id, "model_id": MODEL, "prompt": prompt, **extra}
    body["params"] = {"max_tokens": max_tokens, "temperature": 0}
    subject = node.settings.subject("jobs", MODEL)
    await node.nc.jetstream().publish(subject, msgpack.packb(body), headers={"Nats-Msg-Id": job_id})


async def node_workload(node: Node, requests: list[tuple[str, int]], tag: str) -> list[Any]:
    """Publish all jobs at once; per job, its tokens and seconds to its stored result."""
    done: dict[str, tuple[int, float]] = {}
    all_done = asyncio.Event()
    started = time.perf_counter()

    async def on_result(msg: Msg) -> None:
        if not msg.subject.rsplit(".", 1)[-1].startswith(f"{tag}-"):
            return
        body = verify(msg.data).body
        done[body["job_id"]] = (len(body["output"]["token_ids"]), time.perf_counter() - started)
        if len(done) == len(requests):
            all_done.set()

    sub = await node.nc.subscribe(node.settings.subject("results", "*"), cb=on_result)
    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(publish(node, f"{tag}-{i}", p, m) for i, (p, m) in enumerate(requests))
        )
        await asyncio.wait_for(all_done.wait(), 1200)
    finally:
        await sub.unsubscribe()
    return [done[f"{tag}-{i}"] for i in range(len(requests))]


def _tps(runs: list[tuple[int, float]]) -> float:
    return sum(t for t, _ in runs) / max(s for _, s in runs)


def _short_median(runs: list[tuple[int, float]], requests: list[tuple[str, int]]) -> float:
    return statistics.median(s for (_, s), (_, m) in zip(runs, requests, strict=True) if m == SHORT)


async def first_messages(node: Node, n: int) -> dict[str, Any]:
    """One streaming job at a time: publish -> first stream message; and first_token_s."""
    lat, engine_first = [], []
    for i in range(n):
        job_id = f"stream-{i}"
        first = asyncio.Event()
        result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        stamp: list[float] = []

        async def on_stream(msg: Msg, stamp: list[float] = stamp, first: Any = first) -> None:
            if not stamp:
                stamp.append(time.perf_counter())
                first.set()

        async def on_result(msg: Msg, result: Any = result) -> None:
            if not result.done():
                result.set_result(verify(msg.data).body)

        s1 = await node.nc.subscribe(node.settings.subject("stream", job_id), cb=on_stream)
        s2 = await node.nc.subscribe(node.settings.subject("results", job_id), cb=on_result)
        t0 = time.perf_counter()
        await publish(node, job_id, f"Stream {i} begins", 32, stream=True)
        await asyncio.wait_for(first.wait(), 120)
        body = await asyncio.wait_for(result, 120)
        await s1.unsubscribe()
        await s2.unsubscribe()
        lat.append(stamp[0] - t0)
        engine_first.append(body["usage"]["first_token_s"])
    figures = {
        "jobs": n,
        "first_message_p50_ms": round(percentile(lat, 0.5) * 1000, 1),
        "first_message_p99_ms": round(percentile(lat, 0.99) * 1000, 1),
        "engine_first_token_p50_ms": round(percentile(engine_first, 0.5) * 1000, 1),
        "engine_first_token_p99_ms": round(percentile(engine_first, 0.99) * 1000, 1),
    }
    figures["added_p50_ms"] = round(
        figures["first_message_p50_ms"] - figures["engine_first_token_p50_ms"], 1
    )
    return record(
        "streaming: publish -> first stream message vs engine first token",
        figures,
        None,
        "added p50 <= 20 ms",
    )


async def cancels(node: Node, n: int) -> dict[str, Any]:
    """A long streaming job; once it streams, cancel it: time to its CANCELLED event."""
    lat = []
    for i in range(n):
        job_id = f"cancel-{i}"
        streaming, cancelled = asyncio.Event(), asyncio.Event()

        async def on_stream(msg: Msg, streaming: Any = streaming) -> None:
            streaming.set()

        async def on_error(msg: Msg, job_id: str = job_id, cancelled: Any = cancelled) -> None:
            body = verify(msg.data).body
            if body.get("job_id") == job_id and body["code"] == "CANCELLED":
                cancelled.set()

        s1 = await node.nc.subscribe(node.settings.subject("stream", job_id), cb=on_stream)
        s2 = await node.nc.subscribe(node.settings.subject("events", "error", "*"), cb=on_error)
        await publish(node, job_id, f"Long story {i}", LONG, stream=True)
        await asyncio.wait_for(streaming.wait(), 120)
        t0 = time.perf_counter()
        subject = node.settings.subject("cancel", job_id)
        await node.nc.publish(subject, msgpack.packb({"job_id": job_id}))
        await asyncio.wait_for(cancelled.wait(), 60)
        lat.append(time.perf_counter() - t0)
        await s1.unsubscribe()
        await s2.unsubscribe()
    figures = {
        "jobs": n,
        "cancel_p50_ms": round(percentile(lat, 0.5) * 1000, 1),
        "cancel_p99_ms": round(percentile(lat, 0.99) * 1000, 1),
    }
    return record("cancel: publish -> CANCELLED event", figures, None, "p99 <= 200 ms")


async def main_async(
    engine: str = "vllm", small: bool = False, reps: int = 5
) -> list[dict[str, Any]]:
    from worker.devtools.demomodel import make_demo_model
    from worker.devtools.images import ensure_image_async

    n_mixed, n_uniform, n_lat = (20, 16, 5) if small else (128, 64, 50)
    reps = 1 if small else reps
    image = await ensure_image_async("vllm-cpu" if engine == "vllm" else "echo")
    mixed = mixed_requests(n_mixed)
    uniform = uniform_requests(n_uniform, 64)
    node_runs: dict[str, list[list[tuple[int, float]]]] = {"mixed": [], "uniform": []}
    engine_runs: dict[str, list[list[tuple[int, float]]]] = {"mixed": [], "uniform": []}
    sides = ["engine", "node"] if engine == "vllm" else ["node"]
    with tempfile.TemporaryDirectory(prefix="rst-bench-model-") as tmp:
        model = await asyncio.to_thread(
            make_demo_model, Path(tmp), "llama" if engine == "vllm" else "echo"
        )
        async with node(engine, image, model.directory, model.sha256) as n:
            # The engine gets faster over its first runs: each workload once, untimed (the
            # engine loop warms each up the same way).
            await node_workload(n, mixed, "warm")
            await node_workload(n, uniform, "warmu")
            for rep, side in alternated(sides, reps):
                if side == "engine":
                    got = await asyncio.to_thread(
                        engine_loop, image, model.directory, [mixed, uniform]
                    )
                    engine_runs["mixed"].append(got[0])
                    engine_runs["uniform"].append(got[1])
                else:
                    node_runs["mixed"].append(await node_workload(n, mixed, f"mixed{rep}"))
                    node_runs["uniform"].append(await node_workload(n, uniform, f"uniform{rep}"))
                log.info("interactive_turn rep=%d side=%s", rep, side)
            streaming = await first_messages(n, n_lat)
            cancel = await cancels(n, n_lat)
    figures: dict[str, Any] = {
        "jobs": len(mixed),
        "reps": reps,
        "node_tokens_per_s": summary([_tps(r) for r in node_runs["mixed"]], 0),
        "node_short_median_s": summary([_short_median(r, mixed) for r in node_runs["mixed"]]),
    }
    ratio = None
    if engine_runs["mixed"]:
        pairs = list(zip(node_runs["mixed"], engine_runs["mixed"], strict=True))
        figures["engine_tokens_per_s"] = summary([_tps(r) for r in engine_runs["mixed"]], 0)
        figures["engine_short_median_s"] = summary(
            [_short_median(r, mixed) for r in engine_runs["mixed"]]
        )
        figures["short_median_vs_engine"] = summary(
            [_short_median(a, mixed) / _short_median(b, mixed) for a, b in pairs], 2
        )
        ratio = summary([_tps(a) / _tps(b) for a, b in pairs])
    out: list[dict[str, Any]] = [
        record(
            f"mixed 80% x{SHORT} / 20% x{LONG} tokens: node vs engine loop ({engine})",
            figures,
            ratio,
            ">= 0.9, short median <= 1.5x",
        )
    ]
    uniform_figures: dict[str, Any] = {
        "jobs": len(uniform),
        "max_tokens": 64,
        "reps": reps,
        "node_tokens_per_s": summary([_tps(r) for r in node_runs["uniform"]], 0),
    }
    ratio = None
    if engine_runs["uniform"]:
        pairs = list(zip(node_runs["uniform"], engine_runs["uniform"], strict=True))
        uniform_figures["engine_tokens_per_s"] = summary(
            [_tps(r) for r in engine_runs["uniform"]], 0
        )
        ratio = summary([_tps(a) / _tps(b) for a, b in pairs])
    out.append(
        record(
            f"uniform {len(uniform)} x 64: node vs engine loop ({engine})",
            uniform_figures,
            ratio,
            ">= 0.95",
        )
    )
    for rec in (streaming, cancel):
        rec["figures"]["engine"] = engine
        out.append(rec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["vllm", "echo"], default="vllm")
    parser.add_argument("--small", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(asyncio.run(main_async(args.engine, args.small, args.reps)), indent=2))


if __name__ == "__main__":
    main()
