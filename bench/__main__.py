"""`python -m bench`: every benchmark of the project, one run, one table.

Writes `bench/latest.json` (each benchmark's name, figures, ratio, target, plus the machine
and versions) and `bench/latest.md`, and with `--readme` puts the table in README.md
between the `bench:start` / `bench:end` markers. Ratios compare against a baseline measured
in the same run, on the same machine.
"""

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    docker = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "docker": docker.stdout.strip() or "none",
        "nats_py": version("nats-py"),
        "resultity_node": version("resultity-node"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figures | ratio | target |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        figures = ", ".join(f"{k} {v}" for k, v in r["figures"].items())
        ratio = "" if r["ratio"] is None else f"{r['ratio']}"
        lines.append(f"| {r['name']} | {figures} | {ratio} | {r['target']} |")
    lines.append("")
    lines.append(
        f"Measured {info['when']} on {info['cores']} cores ({info['cpu']}), Python "
        f"{info['python']}, Docker {info['docker']}, nats-py {info['nats_py']}; "
        "command: `python -m bench --readme`."
    )
    return "\n".join(lines)


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench import fetch, memory, runtime, throughput

    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("throughput", lambda: throughput.main_async(args.jobs, args.latency_jobs, "container")),
        ("round trip", lambda: runtime.round_trip("container", 2000)),
        ("cold start", lambda: runtime.cold_start(3)),
        ("fetch", lambda: asyncio.to_thread(fetch.run, args.fetch_mb)),
        ("memory", lambda: memory.main_async(args.memory_jobs, "container")),
    ]
    if not args.skip_vllm:
        from bench import interactive, vllm

        steps.append(("vllm", vllm.batching_efficiency))
        steps.append(("interactive", interactive.main_async))
    results: list[dict[str, Any]] = []
    for name, step in steps:
        started = time.monotonic()
        out = await step()
        results.extend(out if isinstance(out, list) else [out])
        print(f"bench {name}: {time.monotonic() - started:.1f}s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-jobs", type=int, default=500)
    parser.add_argument("--memory-jobs", type=int, default=100_000)
    parser.add_argument("--fetch-mb", type=int, default=1024)
    parser.add_argument("--skip-vllm", action="store_true", help="no vLLM image needed")
    parser.add_argument("--readme", action="store_true", help="update README.md's table")
    args = parser.parse_args()
    results = asyncio.run(run_all(args))
    info = machine()
    (HERE / "latest.json").write_text(
        json.dumps({"machine": info, "benchmarks": results}, indent=2) + "\n"
    )
    md = table(results, info)
    (HERE / "latest.md").write_text(md + "\n")
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
