"""Interactive inference through the whole node (NATS, pipeline, supervisor, hardened
container) next to vLLM's own engine loop in the same image, on the tiny demo model:

- mixed workload: waves of 128 jobs at once, 80 % `max_tokens` 16, 20 % 224, greedy; node
  tokens/s and the median completion time of the short jobs, against the engine loop fed
  each wave's 128 requests at once (targets: tokens/s >= 0.9 of the baseline, short-job
  median <= 1.3x);
- uniform workload: waves of 64 jobs x 64 tokens (target: tokens/s >= 0.95 of the baseline);
- the mixed workload's short jobs by stage on the node (`STAGES`, from the timestamps of
  its results): what they wait for;
- streaming: job publish -> first `stream` message on NATS, p50/p99, next to the engine's
  own `usage.first_token_s` (target: the node adds <= 20 ms p50);
- cancel: cancel publish -> `CANCELLED` error event, p50/p99 (target: p99 <= 200 ms).

Steady figures: a wave lasts about a second here, so each side runs waves one after
another, each starting when the last has finished, until they add up to `--seconds` of
generation (10 by default) per workload and repetition; tokens/s is all their tokens over
all their time, the short-job median is over all their short jobs. The node and the engine
loop take turns (ABBA, `--reps` repetitions, 7 by default): the node stays up (in this
process: the bench's publishing shares its event loop), the engine loop is a fresh
container each turn (vLLM loaded, each workload warmed up with one wave, then timed; the
node's runtime stays loaded meanwhile, idle). Figures and ratios are the median and IQR
over the repetitions, each ratio taken within its repetition; the table flags a row whose
ratio's IQR is over 10 % of its median. `python -m bench.interactive --small` runs each at
a reduced size, one wave, once (a smoke run).
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

from bench.common import (
    alternated,
    connected,
    embedded_nats,
    percentile,
    record,
    spread_pct,
    summary,
)
from worker.core.settings import Settings
from worker.core.signing import NodeKey, verify
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import provision
from worker.jobs.publisher import Publisher
from worker.runtime.api import LaunchSpec

log = logging.getLogger("bench.interactive")

MODEL = "tiny"
SHORT, LONG = 16, 224
REPS = 7
SECONDS = 10.0
SPREAD_LIMIT = 0.10


@dataclass
class Node:
    nc: Client
    settings: Settings


def mixed_requests(n: int) -> list[tuple[str, int]]:
    """n requests, every fifth one long: 80 % short, 20 % long, interleaved."""
    return [(f"Job {i} says", LONG if i % 5 == 4 else SHORT) for i in range(n)]


def uniform_requests(n: int, tokens: int) -> list[tuple[str, int]]:
    return [(f"Prompt number {i} asks the node", tokens) for i in range(n)]


Wave = list[tuple[int, float]]
"""One wave of a workload: per request, its tokens and seconds from the wave's start to its
completion."""


def engine_loop(
    image: str, model_dir: Path, workloads: list[list[tuple[str, int]]], seconds: float
) -> list[list[Wave]]:
    """The baseline: vLLM's engine loop in the same image, each wave's requests all at
    once, waves until `seconds` of generation; per workload, its timed waves."""
    script = Path(__file__).with_name("vllm_engine_loop.py")
    command = ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp"]
    command += ["--shm-size", "512m", "--user", "65534:65534", "-v", f"{model_dir}:/model:ro"]
    command += ["-v", f"{script}:/bench/vllm_engine_loop.py:ro", "--entrypoint", "python3"]
    command += [image, "/bench/vllm_engine_loop.py", json.dumps([workloads, seconds])]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800)
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    reported = json.loads(line.removeprefix("RESULT "))
    return [[[(int(t), float(s)) for t, s in wave] for wave in waves] for waves in reported]


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


STAGES = (
    "publish_to_stored_ms",
    "publish_to_runtime_ms",
    "runtime_ms",
    "engine_first_token_ms",
    "result_ms",
)
"""Where a job's time goes on the node, from timestamps it already has (all wall clock, this
process's: the node runs in it): publish -> its PubAck (stored in the JOBS stream, as this
process saw it: an upper bound, the node shares its event loop); publish -> submitted to
the runtime (`started_at`: the store, the pull, admission, a runtime slot); the runtime's
part (`started_at` -> `finished_at`: the submit frame, the runtime's intake, the engine,
the done frame), of which `engine_first_token_ms` is the engine's own add -> first token;
and the result's way back (`finished_at` -> here: seal, sign, publish, store, delivery)."""


@dataclass
class NodeWave:
    jobs: Wave
    stages: list[dict[str, float]]
    """Per job, in request order: milliseconds by `STAGES`."""
    intake_spread_ms: float
    """First publish -> the last job of the wave submitted to the runtime (the engine loop
    has every request before its first step)."""


async def node_wave(node: Node, requests: list[tuple[str, int]], tag: str) -> NodeWave:
    """Publish all jobs at once; per job, its tokens and seconds to its stored result."""
    done: dict[str, tuple[int, float]] = {}
    stages: dict[str, dict[str, float]] = {}
    published: dict[str, float] = {}
    stored: dict[str, float] = {}
    all_done = asyncio.Event()
    started = time.perf_counter()

    async def on_result(msg: Msg) -> None:
        if not msg.subject.rsplit(".", 1)[-1].startswith(f"{tag}-"):
            return
        now = time.time()
        body = verify(msg.data).body
        job_id = body["job_id"]
        done[job_id] = (len(body["output"]["token_ids"]), time.perf_counter() - started)
        stages[job_id] = {
            "publish_to_stored_ms": (stored.get(job_id, now) - published[job_id]) * 1000,
            "publish_to_runtime_ms": (body["started_at"] - published[job_id]) * 1000,
            "runtime_ms": (body["finished_at"] - body["started_at"]) * 1000,
            "engine_first_token_ms": (body["usage"].get("first_token_s") or 0.0) * 1000,
            "result_ms": (now - body["finished_at"]) * 1000,
            "started_at": body["started_at"],
        }
        if len(done) == len(requests):
            all_done.set()

    async def publish_one(job_id: str, prompt: str, max_tokens: int) -> None:
        published[job_id] = time.time()
        await publish(node, job_id, prompt, max_tokens)
        stored[job_id] = time.time()

    sub = await node.nc.subscribe(node.settings.subject("results", "*"), cb=on_result)
    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(publish_one(f"{tag}-{i}", p, m) for i, (p, m) in enumerate(requests))
        )
        await asyncio.wait_for(all_done.wait(), 1200)
    finally:
        await sub.unsubscribe()
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    spread = max(stages[j].pop("started_at") for j in ids) - min(published.values())
    return NodeWave([done[j] for j in ids], [stages[j] for j in ids], spread * 1000)


async def node_waves(
    node: Node, requests: list[tuple[str, int]], tag: str, seconds: float
) -> list[NodeWave]:
    """Waves one after another until they add up to `seconds` (at least one)."""
    waves: list[NodeWave] = []
    while not waves or sum(_wave_s(w.jobs) for w in waves) < seconds:
        waves.append(await node_wave(node, requests, f"{tag}w{len(waves)}"))
    return waves


def _wave_s(wave: Wave) -> float:
    return max(s for _, s in wave)


def _tps(waves: list[Wave]) -> float:
    return sum(t for wave in waves for t, _ in wave) / sum(_wave_s(w) for w in waves)


def _short_median(waves: list[Wave], requests: list[tuple[str, int]]) -> float:
    return statistics.median(
        s for wave in waves for (_, s), (_, m) in zip(wave, requests, strict=True) if m == SHORT
    )


def stage_record(
    runs: list[list[NodeWave]], engine_runs: list[list[Wave]], requests: list[tuple[str, int]]
) -> dict[str, Any]:
    """The short jobs of the mixed workload by stage: per repetition the median of each
    stage over its short jobs, then median and IQR over the repetitions."""
    figures: dict[str, Any] = {"reps": len(runs)}
    short = [i for i, (_, m) in enumerate(requests) if m == SHORT]
    for stage in STAGES:
        figures[f"short_{stage}"] = summary(
            [statistics.median(w.stages[i][stage] for w in rep for i in short) for rep in runs],
            1,
        )
    figures["short_completion_ms"] = summary(
        [_short_median([w.jobs for w in rep], requests) * 1000 for rep in runs], 1
    )
    if engine_runs:
        figures["engine_loop_short_completion_ms"] = summary(
            [_short_median(rep, requests) * 1000 for rep in engine_runs], 1
        )
    figures["intake_spread_ms"] = summary(
        [statistics.median(w.intake_spread_ms for w in rep) for rep in runs], 1
    )
    return record(
        f"short jobs by stage (mixed workload, x{SHORT} tokens, whole node): median ms",
        figures,
        None,
        "report: where the short jobs wait",
    )


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
    engine: str = "vllm", small: bool = False, reps: int = REPS, seconds: float = SECONDS
) -> list[dict[str, Any]]:
    from worker.devtools.demomodel import make_demo_model
    from worker.devtools.images import ensure_image_async

    n_mixed, n_uniform, n_lat = (20, 16, 5) if small else (128, 64, 50)
    reps, seconds = (1, 0.0) if small else (reps, seconds)
    image = await ensure_image_async("vllm-cpu" if engine == "vllm" else "echo")
    mixed = mixed_requests(n_mixed)
    uniform = uniform_requests(n_uniform, 64)
    node_runs: dict[str, list[list[NodeWave]]] = {"mixed": [], "uniform": []}
    engine_runs: dict[str, list[list[Wave]]] = {"mixed": [], "uniform": []}
    sides = ["engine", "node"] if engine == "vllm" else ["node"]
    with tempfile.TemporaryDirectory(prefix="rst-bench-model-") as tmp:
        model = await asyncio.to_thread(
            make_demo_model, Path(tmp), "llama" if engine == "vllm" else "echo"
        )
        async with node(engine, image, model.directory, model.sha256) as n:
            # The engine gets faster over its first runs: each workload once, untimed (the
            # engine loop warms each up the same way).
            await node_wave(n, mixed, "warm")
            await node_wave(n, uniform, "warmu")
            for rep, side in alternated(sides, reps):
                if side == "engine":
                    got = await asyncio.to_thread(
                        engine_loop, image, model.directory, [mixed, uniform], seconds
                    )
                    engine_runs["mixed"].append(got[0])
                    engine_runs["uniform"].append(got[1])
                else:
                    for name, requests in (("mixed", mixed), ("uniform", uniform)):
                        waves = await node_waves(n, requests, f"{name}{rep}", seconds)
                        node_runs[name].append(waves)
                log.info("interactive_turn rep=%d side=%s", rep, side)
            streaming = await first_messages(n, n_lat)
            cancel = await cancels(n, n_lat)
    node_jobs = {k: [[w.jobs for w in rep] for rep in v] for k, v in node_runs.items()}
    out = [
        mixed_record(node_jobs["mixed"], engine_runs["mixed"], mixed, engine),
        uniform_record(node_jobs["uniform"], engine_runs["uniform"], uniform, engine),
        stage_record(node_runs["mixed"], engine_runs["mixed"], mixed),
    ]
    for rec in (streaming, cancel):
        rec["figures"]["engine"] = engine
        out.append(rec)
    return out


def _generation_s(runs: list[list[Wave]]) -> dict[str, Any]:
    """Seconds of generation per repetition (the waves' durations added up)."""
    return summary([sum(_wave_s(w) for w in rep) for rep in runs], 1)


def mixed_record(
    node_runs: list[list[Wave]],
    engine_runs: list[list[Wave]],
    mixed: list[tuple[str, int]],
    engine: str,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "jobs_per_wave": len(mixed),
        "reps": len(node_runs),
        "node_waves_per_rep": summary([len(r) for r in node_runs], 0),
        "node_generation_s_per_rep": _generation_s(node_runs),
        "node_tokens_per_s": summary([_tps(r) for r in node_runs], 0),
        "node_short_median_s": summary([_short_median(r, mixed) for r in node_runs]),
    }
    ratio = None
    if engine_runs:
        pairs = list(zip(node_runs, engine_runs, strict=True))
        figures["engine_waves_per_rep"] = summary([len(r) for r in engine_runs], 0)
        figures["engine_generation_s_per_rep"] = _generation_s(engine_runs)
        figures["engine_tokens_per_s"] = summary([_tps(r) for r in engine_runs], 0)
        figures["engine_short_median_s"] = summary([_short_median(r, mixed) for r in engine_runs])
        short = summary([_short_median(a, mixed) / _short_median(b, mixed) for a, b in pairs], 2)
        figures["short_median_vs_engine"] = short
        figures["short_median_vs_engine_spread_pct"] = spread_pct(short)
        ratio = summary([_tps(a) / _tps(b) for a, b in pairs])
        figures["targets_met"] = {  # judged on the medians: reported, never asserted
            "tokens_per_s_ge_0.9": ratio["median"] >= 0.9,
            "short_median_le_1.3x": short["median"] <= 1.3,
        }
    return record(
        f"mixed 80% x{SHORT} / 20% x{LONG} tokens: node vs engine loop ({engine})",
        figures,
        ratio,
        ">= 0.9, short median <= 1.3x",
        spread_limit=SPREAD_LIMIT,
    )


def uniform_record(
    node_runs: list[list[Wave]],
    engine_runs: list[list[Wave]],
    uniform: list[tuple[str, int]],
    engine: str,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "jobs_per_wave": len(uniform),
        "max_tokens": 64,
        "reps": len(node_runs),
        "node_waves_per_rep": summary([len(r) for r in node_runs], 0),
        "node_generation_s_per_rep": _generation_s(node_runs),
        "node_tokens_per_s": summary([_tps(r) for r in node_runs], 0),
    }
    ratio = None
    if engine_runs:
        pairs = list(zip(node_runs, engine_runs, strict=True))
        figures["engine_waves_per_rep"] = summary([len(r) for r in engine_runs], 0)
        figures["engine_generation_s_per_rep"] = _generation_s(engine_runs)
        figures["engine_tokens_per_s"] = summary([_tps(r) for r in engine_runs], 0)
        ratio = summary([_tps(a) / _tps(b) for a, b in pairs])
        figures["targets_met"] = {"tokens_per_s_ge_0.95": ratio["median"] >= 0.95}
    return record(
        f"uniform {len(uniform)} x 64: node vs engine loop ({engine})",
        figures,
        ratio,
        ">= 0.95",
        spread_limit=SPREAD_LIMIT,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["vllm", "echo"], default="vllm")
    parser.add_argument("--small", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--reps", type=int, default=REPS, help="alternated repetitions")
    parser.add_argument(
        "--seconds", type=float, default=SECONDS, help="generation per side and repetition"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    got = asyncio.run(main_async(args.engine, args.small, args.reps, args.seconds))
    print(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
