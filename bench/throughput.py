"""Jobs/s and CPU per job: the agent vs raw nats-py floors vs FastStream.

Each contender (`bench.consumers`: strong, matched, faststream, agent) runs in its own
process against one embedded nats-server, on the same N jobs stored beforehand in fresh
streams. The timed window runs from `GO` until the N-th result is stored (and, for the
floors, its job acked). CPU per job is read over the same window for the contender
process (its rusage), nats-server (/proc) and, for the agent, the runtime container
(its cgroup); dockerd and containerd are reported apart, per job and per second of the
window (the attach stream runs through dockerd, which every other container on the
machine shares: the floors' figure, with no container, is the background level).
Repetitions alternate the order (ABBA); every figure is a median and IQR, and the ratios
are taken within each repetition.

    python -m bench.throughput --jobs 20000 --reps 5 [--profile]
"""

import argparse
import asyncio
import json
import signal
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    Child,
    alternated,
    connected,
    container_cpu_s,
    drop_streams,
    embedded_nats,
    fill_jobs,
    fresh_streams,
    pids_cpu_s,
    pids_named,
    proc_cpu_s,
    record,
    summary,
)
from bench.consumers import KINDS

TARGET = ">= 0.5 of the strong floor"


async def one_run(url: str, server_pid: int, kind: str, prefix: str, n: int) -> dict[str, float]:
    """One contender, one run: jobs/s and CPU microseconds per job."""
    docker = pids_named("dockerd", "containerd")
    async with connected(url) as nc:
        settings = await fresh_streams(nc, prefix)
        await fill_jobs(nc, settings, n)
        child = Child("bench.consumers", kind, "--url", url, "--prefix", prefix, "--jobs", str(n))
        try:
            ready = await asyncio.to_thread(child.expect, "READY")
            cid = ready.get("container_id")
            server0 = proc_cpu_s(server_pid)
            runtime0 = container_cpu_s(cid) if cid else None
            docker0 = pids_cpu_s(docker)
            child.send("GO")
            done = await asyncio.to_thread(child.expect, "DONE", 900)
            server1 = proc_cpu_s(server_pid)
            runtime1 = container_cpu_s(cid) if cid else None
            docker1 = pids_cpu_s(docker)
            child.send("BYE")
        finally:
            await asyncio.to_thread(child.close)
        await drop_streams(nc, settings)
    out = {
        "jobs_per_s": n / done["seconds"],
        "client_cpu_us_per_job": done["cpu_s"] / n * 1e6,
        "server_cpu_us_per_job": (server1 - server0) / n * 1e6,
    }
    if runtime0 is not None and runtime1 is not None:
        out["runtime_cpu_us_per_job"] = (runtime1 - runtime0) / n * 1e6
    out["total_cpu_us_per_job"] = sum(v for k, v in out.items() if k.endswith("cpu_us_per_job"))
    if docker:
        # dockerd proxies the runtime's attach stream; it is shared with everything else
        # on the machine, so the floors' figure (no container) is the background level
        out["dockerd_cpu_us_per_job"] = (docker1 - docker0) / n * 1e6
        out["dockerd_cpu_s_per_s"] = (docker1 - docker0) / done["seconds"]
    return out


async def throughput(
    url: str, server_pid: int, n: int, reps: int, kinds: tuple[str, ...] = KINDS
) -> dict[str, Any]:
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rep, kind in alternated(kinds, reps):
        got = await one_run(url, server_pid, kind, f"t{rep}{kind[:3]}", n)
        for metric, value in got.items():
            runs[kind][metric].append(value)
    figures: dict[str, Any] = {"jobs": n, "reps": reps}
    for kind in kinds:
        for metric, values in runs[kind].items():
            figures[f"{kind}_{metric}"] = summary(values, 1)
    ratio = None
    if "agent" in kinds:
        agent = runs["agent"]["jobs_per_s"]
        for base in kinds:
            if base != "agent":
                pairs = [a / b for a, b in zip(agent, runs[base]["jobs_per_s"], strict=True)]
                figures[f"agent_vs_{base}"] = summary(pairs)
        ratio = figures.get("agent_vs_strong")
    return record(
        "throughput: agent vs strong nats-py floor (jobs/s, CPU us/job)", figures, ratio, TARGET
    )


# Where the agent's CPU goes, from py-spy samples of its process (idle threads are not
# sampled, so samples are CPU time). Each sample goes to the innermost frame that names a
# stage; a sample with no such frame is the event loop's own work.
STAGES = [
    ("signing (Ed25519)", ("sign_bytes (",)),
    ("admit: decode, checks, input hash", ("admit (",)),
    (
        "result body (validate, encode) and runtime payload",
        ("seal_result (", "_result_fields (", "_payload (", "padded_body (", "result_body ("),
    ),
    ("runtime: submit frame out, partial/done frames in", ("worker/runtime/", "schemas/frames")),
    ("result publish (nats-py)", ("store_result (", "publish_async (", "_on_ack (")),
    ("ack (nats-py)", ("_settle (", "ack (nats/aio/msg.py", "_ack_loop (")),
    ("pull requests", ("_pull_if_due (", "_request (", "settled (")),
    ("nats-py read loop: parse, dispatch", ("_read_loop (",)),
    ("nats-py flusher: socket writes", ("_flusher (",)),
    (
        "pipeline: submit, answer, result",
        ("_start (", "_answered (", "_results_loop (", "_succeed (", "_store ("),
    ),
    ("intake callback", ("_deliver (", "_on_message (", "strong (", "with_agent_work (")),
    ("JobSource loop (wake, wait_for)", ("jobs/intake.py",)),
    ("pipeline, other", ("worker/jobs/pipeline",)),
]


LOOP_THREAD = "run_forever ("
IDLE_LEAF = "select (selectors.py"


def stage_breakdown(raw: str) -> dict[str, float]:
    """Share of samples per stage from py-spy's raw (collapsed) output, sampled with
    `--idle`: a C call that released the GIL (Ed25519 signing, a socket write) is CPU time
    py-spy would otherwise leave out. Kept: the event loop's thread (the others wait for
    blocking Docker calls), but for its wait for I/O."""
    totals: dict[str, int] = defaultdict(int)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if LOOP_THREAD not in stack or stack.rsplit(";", 1)[-1].startswith(IDLE_LEAF):
            continue
        stage = "event loop, other"
        for frame in reversed(stack.split(";")):
            hit = next((s for s, needles in STAGES if any(n in frame for n in needles)), None)
            if hit is not None:
                stage = hit
                break
        totals[stage] += int(count)
    total = sum(totals.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(totals.items(), key=lambda x: -x[1])}


async def profile(
    url: str, n: int, kind: str = "agent", keep: Path | None = None
) -> dict[str, Any]:
    """One run of `kind` sampled by py-spy: where its per-job CPU goes, by stage."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "spy.txt"
        async with connected(url) as nc:
            settings = await fresh_streams(nc, "prof")
            await fill_jobs(nc, settings, n)
            child = Child(
                "bench.consumers", kind, "--url", url, "--prefix", "prof", "--jobs", str(n)
            )
            try:
                await asyncio.to_thread(child.expect, "READY")
                spy = subprocess.Popen(  # noqa: ASYNC220 - py-spy runs beside us
                    ["py-spy", "record", "--pid", str(child.pid), "--format", "raw", "--rate",
                     "500", "--nonblocking", "--idle", "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                child.send("GO")
                done = await asyncio.to_thread(child.expect, "DONE", 900)
                spy.send_signal(signal.SIGINT)
                await asyncio.to_thread(spy.wait, 30)
                child.send("BYE")
            finally:
                await asyncio.to_thread(child.close)
            await drop_streams(nc, settings)
        cpu_us = done["cpu_s"] / n * 1e6
        raw = await asyncio.to_thread(out.read_text)
        shares = stage_breakdown(raw)
        if keep is not None:
            await asyncio.to_thread(keep.write_text, raw)
    return {
        "kind": kind,
        "jobs": n,
        "jobs_per_s": round(n / done["seconds"]),
        "cpu_us_per_job": round(cpu_us, 1),
        "cpu_us_per_job_by_stage": {k: round(v * cpu_us, 1) for k, v in shares.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--profile", choices=KINDS, help="sample one contender with py-spy")
    parser.add_argument("--profile-out", type=Path, help="keep py-spy's raw (collapsed) stacks")
    args = parser.parse_args()

    async def go() -> Any:
        with embedded_nats() as server:
            assert server.pid is not None
            if args.profile:
                return await profile(server.url, args.jobs, args.profile, args.profile_out)
            kinds = tuple(args.kinds.split(","))
            return await throughput(server.url, server.pid, args.jobs, args.reps, kinds)

    print(json.dumps(asyncio.run(go()), indent=2))


if __name__ == "__main__":
    main()
