"""`python -m bench --quick` (every benchmark but vLLM) runs end to end and writes a
complete `latest.json`: keeps the harness from rotting. No figure is judged here; the
benchmarks' targets are targets, not assertions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.devtools.natsd import NatsServer

pytestmark = [pytest.mark.docker, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]


def medians(figures: dict[str, Any]) -> dict[str, float]:
    return {k: v["median"] for k, v in figures.items() if isinstance(v, dict) and "median" in v}


def test_quick_bench_writes_every_figure(
    tmp_path: Path, docker_client: object, nats_server: NatsServer
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--skip-vllm", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["machine"]["quick"] is True
    by_name = {b["name"].split(":")[0]: b for b in report["benchmarks"]}
    assert set(by_name) == {
        "throughput",
        "agent CPU per job by stage (py-spy, one run)",
        "added latency per job",
        "echo frame round trip (container)",
        "runtime cold start to ready",
        "model fetch + verify + fsync (ratio",
        "agent memory over a long run (own process)",
    }
    for bench in report["benchmarks"]:
        for name, value in medians(bench["figures"]).items():
            assert value is not None and math.isfinite(value), (bench["name"], name)
    throughput = medians(by_name["throughput"]["figures"])
    for kind in ("strong", "matched", "faststream", "agent"):
        assert throughput[f"{kind}_jobs_per_s"] > 0
        assert throughput[f"{kind}_client_cpu_us_per_job"] > 0
    assert "agent_runtime_cpu_us_per_job" in throughput
    assert by_name["throughput"]["ratio"]["median"] > 0
    latency = medians(by_name["added latency per job"]["figures"])
    for level in ("serial", "at_25pct", "at_50pct", "at_75pct"):
        assert latency[f"{level}_unanswered"] == 0
    memory = by_name["agent memory over a long run (own process)"]["figures"]
    assert memory["samples"] > 0 and len(memory["gc_objects_at"]) >= 2
    assert (tmp_path / "latest.md").read_text().startswith("| benchmark |")
