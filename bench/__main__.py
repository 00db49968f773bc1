"""`python -m bench`: every benchmark of the project, one run, one table.

Writes `bench/latest.json` (each benchmark's figures, ratio and target, with the machine
and versions) and `bench/latest.md`, and with `--readme` puts the table in README.md
between the `bench:start` / `bench:end` markers. Every figure is the median and IQR over
repetitions alternated within this run, on this machine; targets are targets, never
asserted by the tests. `--quick` runs every benchmark at a tiny size (a smoke test of
the harness, not figures to quote).
"""

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.common import embedded_nats, spread_pct

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NAMES = (
    "throughput",
    "profile",
    "latency",
    "runtime",
    "fetch",
    "memory",
    "vllm",
    "interactive",
    "serve",
    "loadout",
)
NEEDS_VLLM = ("vllm", "interactive", "serve")


@dataclass(frozen=True)
class Sizes:
    jobs: int = 20_000
    reps: int = 5
    profile_jobs: int = 20_000
    latency_seconds: float = 3.0
    latency_reps: int = 3
    serial_jobs: int = 300
    round_trips: int = 2000
    cold_starts: int = 10
    fetch_mb: int = 1024
    fetch_reps: int = 3
    fetch_cold_reps: int = 1
    memory_jobs: int = 300_000
    vllm_starts: int = 5
    vllm_rounds: int = 8
    interactive_small: bool = False
    interactive_reps: int = 7
    interactive_seconds: float = 10.0
    serve_reps: int = 5
    serve_requests: int = 64
    loadout_backend: str = "docker"
    loadout_switches: int = 10
    loadout_reps: int = 5
    loadout_cut_jobs: int = 8
    loadout_bursts: int = 8
    loadout_burst: int = 40


QUICK = Sizes(
    jobs=2000,
    reps=1,
    profile_jobs=2000,
    latency_seconds=0.5,
    latency_reps=1,
    serial_jobs=30,
    round_trips=100,
    cold_starts=1,
    fetch_mb=8,
    fetch_reps=1,
    fetch_cold_reps=0,
    memory_jobs=3000,
    vllm_starts=1,
    vllm_rounds=2,
    interactive_small=True,
    interactive_reps=1,
    interactive_seconds=0.0,
    serve_reps=1,
    serve_requests=1,
    loadout_backend="process",
    loadout_switches=1,
    loadout_reps=1,
    loadout_cut_jobs=2,
    loadout_bursts=2,
    loadout_burst=3,
)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def _command(*args: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return (out.stdout.strip() or "none").splitlines()[0]


def machine() -> dict[str, Any]:
    from worker.devtools.natsd import find_binary

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "docker": _command("docker", "version", "--format", "{{.Server.Version}}"),
        "nats_server": _command(find_binary(), "--version"),
        "nats_py": _version("nats-py"),
        "docker_py": _version("docker"),
        "faststream": _version("faststream"),
        "resultity_node": _version("resultity-node"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and "median" in value:
        med, iqr = value["median"], value["iqr"]
        return f"{med:g} [IQR {iqr:g}]" if value.get("n", 0) > 1 else f"{med:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _spread(r: dict[str, Any]) -> str:
    """The ratio's IQR over its median, flagged past the row's `spread_limit`."""
    ratio, limit = r["ratio"], r.get("spread_limit")
    if limit is None or not isinstance(ratio, dict):
        return ""
    spread = spread_pct(ratio)
    if spread is None:
        return ""
    if spread > limit * 100:
        return f"<br>**spread {spread:g} % > {limit * 100:g} %: not steady**"
    return f"<br>spread {spread:g} %"


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figures: median [IQR] over alternated repetitions | ratio | target |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        figures = "<br>".join(f"{k} {_fmt(v)}" for k, v in r["figures"].items())
        ratio = "" if r["ratio"] is None else _fmt(r["ratio"]) + _spread(r)
        lines.append(f"| {r['name']} | {figures} | {ratio} | {r['target']} |")
    lines.append("")
    lines.append(
        f"Measured {info['when']} on {info['cores']} cores ({info['cpu']}, load "
        f"{info['load_avg_1m_at_end']} at the end), kernel {info['kernel']}, Python "
        f"{info['python']}, Docker {info['docker']}, {info['nats_server']}, nats-py "
        f"{info['nats_py']}, docker-py {info['docker_py']}, FastStream {info['faststream']}; "
        f"command: `{info['command']}`."
    )
    return "\n".join(lines)


async def run_all(names: list[str], sizes: Sizes, floor_rate: float) -> list[dict[str, Any]]:
    from bench import fetch, latency, memory, runtime, throughput

    results: list[dict[str, Any]] = []
    with embedded_nats() as server:
        assert server.pid is not None
        url, pid = server.url, server.pid

        async def do_throughput() -> dict[str, Any]:
            nonlocal floor_rate
            out = await throughput.throughput(url, pid, sizes.jobs, sizes.reps)
            floor_rate = out["figures"]["strong_jobs_per_s"]["median"]
            return out

        async def do_profile() -> dict[str, Any]:
            got = await throughput.profile(url, sizes.profile_jobs, "agent")
            return {
                "name": "agent CPU per job by stage (py-spy, one run)",
                "figures": got,
                "ratio": None,
                "target": "report",
            }

        steps: dict[str, Callable[[], Awaitable[Any]]] = {
            "throughput": do_throughput,
            "profile": do_profile,
            "latency": lambda: latency.latency(
                url, floor_rate, sizes.latency_seconds, sizes.latency_reps, sizes.serial_jobs
            ),
            "runtime": lambda: _runtime(runtime, sizes),
            "fetch": lambda: asyncio.to_thread(
                fetch.run, sizes.fetch_mb, sizes.fetch_reps, sizes.fetch_cold_reps
            ),
            "memory": lambda: memory.memory(url, sizes.memory_jobs),
            "vllm": lambda: _vllm(sizes),
            "interactive": lambda: _interactive(sizes),
            "serve": lambda: _serve(sizes),
            "loadout": lambda: _loadout(sizes),
        }
        for name in names:
            started = time.monotonic()
            out = await steps[name]()
            results.extend(out if isinstance(out, list) else [out])
            print(f"bench {name}: {time.monotonic() - started:.1f}s", flush=True)
    return results


async def _runtime(runtime: Any, sizes: Sizes) -> list[dict[str, Any]]:
    return [
        await runtime.round_trip("container", sizes.round_trips),
        await runtime.cold_start(sizes.cold_starts),
    ]


async def _vllm(sizes: Sizes) -> dict[str, Any]:
    from bench import vllm

    out: dict[str, Any] = await vllm.batching_overhead(sizes.vllm_starts, sizes.vllm_rounds)
    return out


async def _interactive(sizes: Sizes) -> list[dict[str, Any]]:
    from bench import interactive

    return await interactive.main_async(
        "vllm",
        small=sizes.interactive_small,
        reps=sizes.interactive_reps,
        seconds=sizes.interactive_seconds,
    )


async def _serve(sizes: Sizes) -> list[dict[str, Any]]:
    from bench import serve

    return await serve.main_async("vllm", reps=sizes.serve_reps, requests=sizes.serve_requests)


async def _loadout(sizes: Sizes) -> list[dict[str, Any]]:
    from bench import loadout

    return await loadout.main_async(
        sizes.loadout_backend,
        sizes.loadout_switches,
        sizes.loadout_reps,
        sizes.loadout_cut_jobs,
        sizes.loadout_bursts,
        sizes.loadout_burst,
    )


def _size(kind: type, value: str) -> Any:
    if kind is bool:
        return value.lower() in {"1", "true", "yes"}
    return kind(value)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument(
        "--skip-vllm", action="store_true", help=f"no vLLM image needed: skips {NEEDS_VLLM}"
    )
    parser.add_argument("--floor-rate", type=float, default=8000, help="latency, w/o throughput")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SIZE=N", help="override one size"
    )
    parser.add_argument("--readme", action="store_true", help="update README.md's table")
    parser.add_argument("--out", type=Path, default=HERE, help="where latest.json/.md go")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(NAMES)
    unknown = set(names) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(NAMES)}")
    if args.skip_vllm:
        names = [n for n in names if n not in NEEDS_VLLM]
    sizes = QUICK if args.quick else Sizes()
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Sizes.__dataclass_fields__:
            parser.error(f"unknown size {key!r}; known: {', '.join(Sizes.__dataclass_fields__)}")
        sizes = replace(sizes, **{key: _size(type(getattr(sizes, key)), value)})
    results = asyncio.run(run_all(names, sizes, args.floor_rate))
    info = machine()
    info["quick"] = args.quick
    info["command"] = " ".join(["python -m bench", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(
        json.dumps({"machine": info, "benchmarks": results}, indent=2) + "\n"
    )
    md = table(results, info)
    (args.out / "latest.md").write_text(md + "\n")
    print(md)
    if args.readme:
        text = README.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            tail = rest.split(END, 1)[1]
            README.write_text(f"{head}{START}\n{md}\n{END}{tail}")
        else:
            print(f"README.md has no {START} marker; table not inserted")


if __name__ == "__main__":
    main()
