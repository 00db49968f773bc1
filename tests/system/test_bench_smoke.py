"""`python -m bench --quick` (every benchmark but vLLM) runs end to end and writes a
complete `latest.json`, and the serve row's harness runs in its smaller forms: keeps the
harness from rotting. No figure is judged here; the benchmarks' targets are targets, not
assertions."""

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.support.polling import wait_for
from worker.devtools.natsd import NatsServer

ROOT = Path(__file__).resolve().parents[2]


def medians(figures: dict[str, Any]) -> dict[str, float]:
    return {k: v["median"] for k, v in figures.items() if isinstance(v, dict) and "median" in v}


@pytest.mark.docker
@pytest.mark.nats
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
        "switch downtime (last old result -> first new) / runtime cold start (echo)",
        "jobs cut by a snapshot that does not touch the loaded model",
        "two models alternating",
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
    switch = by_name["switch downtime (last old result -> first new) / runtime cold start (echo)"]
    assert switch["figures"]["switches"] >= 1
    assert (tmp_path / "latest.md").read_text().startswith("| benchmark |")


# -- the serve row (`bench.serve`) ------------------------------------------------------
#
# Its full form needs the vLLM image and three vLLM starts (minutes here), so CI runs the
# harness in two smaller ways: against fake OpenAI servers started here (the comparison:
# alternation, ratios, targets, the table), and through a real dev network on the echo
# runtime (the dev node the bench starts, its gateway, its key, the CPU counters).


def fake_openai(delay_s: float) -> Starlette:
    """An OpenAI-compatible streaming chat server: one token a chunk, `delay_s` apart."""

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        tokens = int(body["max_tokens"])

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for i in range(tokens):
                await asyncio.sleep(delay_s)
                yield chunk({"content": f" t{i}"})
            yield chunk({}, "length")
            usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}
            last = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
            last |= {"model": body["model"], "choices": [], "usage": usage}
            yield b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@contextlib.asynccontextmanager
async def fake_server(delay_s: float) -> AsyncIterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(fake_openai(delay_s), log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_for(lambda: server.started, timeout=30)
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        finally:
            server.should_exit = True
            await task


async def test_serve_harness_compares_two_openai_servers() -> None:
    from bench import serve
    from bench.__main__ import table

    async with fake_server(0.0) as fast, fake_server(0.002) as slow:
        endpoints = [
            serve.Endpoint("vllm_serve", fast, "none", "m", lambda: {"engine": 0.0}),
            serve.Endpoint("gateway", slow, "k", "m", lambda: {"node": 0.0}),
        ]
        records = await serve.compare(endpoints, reps=2, requests=4, concurrency=(1, 8))
    assert [r["figures"]["streams"] for r in records] == [1, 8]
    for rec in records:
        figures = rec["figures"]
        assert figures["requests"] == max(4, figures["streams"]) and figures["reps"] == 2
        for side in ("vllm_serve", "gateway"):
            assert figures[f"{side}_tokens_per_request"]["median"] == serve.MAX_TOKENS
            assert figures[f"{side}_chunks_per_request"]["median"] == serve.MAX_TOKENS
            for metric in serve.METRICS:
                assert figures[f"{side}_{metric}"]["n"] == 2, (side, metric)
                assert math.isfinite(figures[f"{side}_{metric}"]["median"]), (side, metric)
            assert "client" in figures[f"{side}_cpu_ms_per_1k_tokens"]
        assert set(figures["vllm_serve_cpu_ms_per_1k_tokens"]) == {"engine", "client"}
        assert set(figures["gateway_cpu_ms_per_1k_tokens"]) == {"node", "client"}
        assert rec["ratio"]["n"] == 2 and rec["ratio"]["median"] > 0
        assert figures["ttft_p50_added_ms"]["n"] == 2
        assert rec["target"] == serve.TARGETS[figures["streams"]]
        assert all(isinstance(v, bool) for v in figures["targets_met"].values())
    assert "ttft_p50_added_le_25ms" in records[0]["figures"]["targets_met"]
    info = {"when": "now", "cores": 2, "cpu": "cpu", "load_avg_1m_at_end": 0.0}
    info |= {k: "v" for k in ("kernel", "python", "docker", "nats_server", "nats_py")}
    info |= {k: "v" for k in ("docker_py", "faststream", "command")}
    md = table(records, info)
    assert md.count("| serve N=") == 2 and "spread" in md


def test_vllm_serve_gets_the_runtime_engine_arguments() -> None:
    from bench import serve
    from containers.runtime.engines.vllm import CPU_DEFAULTS

    command = serve.vllm_serve_command("img", Path("/m"), "name")
    assert command[command.index("--shm-size") + 1] == "1g"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU=0" in command
    assert command[command.index("--max-model-len") + 1] == str(CPU_DEFAULTS["max_model_len"])
    assert command[command.index("--dtype") + 1] == CPU_DEFAULTS["dtype"]
    assert command[command.index("--kv-cache-memory-bytes") + 1] == str(256 << 20)
    assert "--enforce-eager" in command and command[command.index("--seed") + 1] == "0"
    assert command[command.index("--max-num-seqs") + 1] == "256"
    published = command[command.index("-p") + 1]
    assert published.startswith("127.0.0.1:")


@pytest.mark.docker
@pytest.mark.nats
def test_quick_serve_through_an_echo_dev_network(tmp_path: Path, docker_client: object) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--engine", "echo", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    *records, profile = json.loads(proc.stdout)
    assert [r["figures"]["streams"] for r in records] == [1, 8, 32]
    assert profile["name"].startswith("gateway process CPU by stage")
    assert "process_cpu_ms_per_1k_tokens" in profile["figures"] or profile["figures"]["skipped"]
    for rec in records:
        figures = rec["figures"]
        assert figures["gateway_tokens_per_request"]["median"] > 0
        for name, value in medians(figures).items():
            assert value is not None and math.isfinite(value), (rec["name"], name)
        assert {"agent_and_gateway", "nats_server", "client"} <= set(
            figures["gateway_cpu_ms_per_1k_tokens"]
        )


def test_profile_stages_take_the_innermost_stage() -> None:
    from bench.serve import profile_stages

    raw = "\n".join(
        [
            "run (uvicorn/server.py:1);_stream (worker/gateway/app.py:2);"
            "verify (worker/core/signing.py:3);_verify (nacl/bindings.py:4) 3",
            "run (uvicorn/server.py:1);_stream (worker/gateway/app.py:2);dumps (json/x.py:5) 1",
            "_run_once (asyncio/base_events.py:1);select (selectors.py:2) 4",
        ]
    )
    assert profile_stages(raw) == {"signature verify (Ed25519)": 0.75, "JSON": 0.25}


def test_serve_reads_the_gateway_key_of_the_dev_home(tmp_path: Path) -> None:
    from bench.serve import client_key

    assert client_key(tmp_path) == "none"
    (tmp_path / "client.json").write_text(json.dumps({"network": "dev"}))
    assert client_key(tmp_path) == "none"
    (tmp_path / "client.json").write_text(json.dumps({"gateway_api_key": "rst-k"}))
    assert client_key(tmp_path) == "rst-k"


@pytest.mark.docker
@pytest.mark.nats
def test_small_interactive_on_the_echo_engine_reports_the_short_jobs_by_stage(
    docker_client: object,
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.interactive", "--engine", "echo", "--small"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_name = {r["name"].split(":")[0].split(" (")[0]: r for r in json.loads(proc.stdout)}
    mixed = by_name["mixed 80% x16 / 20% x224 tokens"]["figures"]
    assert mixed["node_waves_per_rep"]["median"] >= 1 and mixed["reps"] == 1
    stages = by_name["short jobs by stage"]["figures"]
    for stage in ("publish_to_stored", "publish_to_runtime", "runtime", "result", "completion"):
        value = stages[f"short_{stage}_ms"]["median"]
        assert value is not None and math.isfinite(value) and value >= 0, stage
    assert stages["intake_spread_ms"]["median"] >= 0
