"""Real vLLM in the CPU runtime image on the tiny demo model, plus the demo model's
reproducibility. The image build is slow the first time (see worker/devtools/images.py)."""

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from schemas import frames
from tests.support.settings import make_settings
from tests.support.vllm import HAS_MODEL_DEPS, ContainerRuntime, tiny_llama
from worker.core.errors import DeadlineExceeded
from worker.devtools import demomodel, images
from worker.runtime.api import Completion, LaunchSpec, Partial, WorkItem
from worker.runtime.container import DockerBackend
from worker.runtime.supervisor import Supervisor


def test_echo_demo_model_archive_is_reproducible(tmp_path: Path) -> None:
    one = demomodel.make_demo_model(tmp_path / "one", "echo")
    two = demomodel.make_demo_model(tmp_path / "two", "echo")
    assert one.sha256 == two.sha256
    assert one.archive.read_bytes() == two.archive.read_bytes()


def test_archive_ignores_times_and_owners(tmp_path: Path) -> None:
    model = demomodel.make_echo_model(tmp_path / "model")
    first = demomodel.write_archive(model, tmp_path / "a.tar")
    os.utime(model / "weights.bin", (12345, 12345))
    assert demomodel.write_archive(model, tmp_path / "b.tar") == first
    (model / "weights.bin").write_bytes(b"changed")
    assert demomodel.write_archive(model, tmp_path / "c.tar") != first


@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="needs the models extra (torch, transformers)")
def test_tiny_llama_is_byte_identical_across_runs(tmp_path: Path) -> None:
    one = demomodel.make_demo_model(tmp_path / "one", "llama")
    two = demomodel.make_demo_model(tmp_path / "two", "llama")
    assert one.sha256 == two.sha256
    assert (one.directory / "model.safetensors").stat().st_size > 1_000_000


def _req(prompt: str, **params: Any) -> dict[str, Any]:
    return {"prompt": prompt, "params": {"max_tokens": 24, **params}}


@pytest.fixture(scope="module")
def vllm_runtime(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = tiny_llama(tmp_path_factory.mktemp("tiny"), image_id)
    runtime = ContainerRuntime(image_id, model.directory, model.sha256)
    ready = runtime.receive(timeout=300)
    runtime.seen.append(ready)
    yield runtime, model
    runtime.close()


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_ready_and_alone_vs_busy_batch(vllm_runtime: Any) -> None:
    """Token ids of a request are identical alone and inside a busy continuous batch."""
    runtime, model = vllm_runtime
    ready = runtime.seen[0]
    assert ready["t"] == "ready" and ready["proto"] == frames.PROTOCOL_VERSION, ready
    assert ready["engine"] == "vllm" and ready["device"] == "cpu" and ready["max_active"] > 0
    assert ready["engine_version"].startswith("0.32")
    assert ready["model_sha256"] == model.sha256

    greedy = _req("The quick brown fox")
    sampled = _req("Models are verified", temperature=0.8, top_p=0.9, seed=7)
    tokens = {"prompt_token_ids": [0, 40, 41, 42, 43], "params": {"max_tokens": 8, "seed": 3}}
    alone = [runtime.alone(r) for r in (greedy, sampled, tokens)]
    for outcome in alone:
        assert outcome["t"] == "done", outcome
        assert outcome["token_ids"] and outcome["finish_reason"] in ("stop", "length")
        assert outcome["first_token_s"] > 0
    assert len(alone[0]["token_ids"]) <= 24 and len(alone[2]["token_ids"]) <= 8
    assert alone[2]["prompt_tokens"] == 5

    # a busy engine: fillers already generating when the fixed requests join, one by one
    fillers = [
        runtime.submit(_req(f"once upon a time number {i}", seed=i, max_tokens=64))
        for i in range(29)
    ]
    runtime.until("partial", runtime.submit(_req("streaming filler", max_tokens=64), stream=True))
    joined = [runtime.submit(r) for r in (greedy, sampled, tokens)]
    together = [runtime.outcome(i) for i in joined]
    for i in fillers:
        assert runtime.outcome(i)["t"] == "done"
    for a, b in zip(alone, together, strict=True):
        assert (a["token_ids"], a["text"]) == (b["token_ids"], b["text"])

    too_long = runtime.submit(_req("fox " * 400))
    after = runtime.submit(greedy)
    assert runtime.outcome(too_long)["code"] == "bad_request"
    assert runtime.outcome(after)["token_ids"] == alone[0]["token_ids"]


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_short_request_overtakes_and_streams_concatenate(vllm_runtime: Any) -> None:
    runtime, _ = vllm_runtime
    long = runtime.submit(_req("A long story begins", max_tokens=200), stream=True)
    runtime.until("partial", long)
    short = runtime.submit(_req("Short", max_tokens=4))
    done_long = runtime.outcome(long)
    order = runtime.finished_order()
    assert order.index(short) < order.index(long)
    streamed = [t for p in runtime.partials(long) for t in p["token_ids"]]
    assert streamed and streamed == done_long["token_ids"][: len(streamed)]
    assert done_long["text"].startswith("".join(p["text"] for p in runtime.partials(long)))


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_pong_carries_the_scheduler_figures(vllm_runtime: Any) -> None:
    runtime, _ = vllm_runtime
    # Longer than one KV block of the CPU engine (128 tokens), so a block of it is cached.
    shared = "The same long prompt, twice over, for the prefix cache " * 5
    runtime.alone(_req(shared, max_tokens=4))
    first = runtime.submit(_req("A long story begins", max_tokens=200), stream=True)
    runtime.until("partial", first)
    second = runtime.submit(_req(shared, max_tokens=80), stream=True)
    runtime.until("partial", second)
    runtime.send(frames.ping(7001))
    busy = frames.parse_pong(runtime.until("pong", 7001))["stats"]
    assert busy["running"] + busy["waiting"] == 2, busy
    assert 0 < busy["kv_cache_usage"] <= 1, busy
    assert 0 < busy["prefix_cache_hits"] < busy["prefix_cache_queries"], (
        "the second run of the shared prompt found its first block cached",
        busy,
    )
    runtime.send(frames.abort(first))
    runtime.send(frames.abort(second))
    assert {runtime.outcome(first)["t"], runtime.outcome(second)["t"]} <= {"failed", "done"}
    runtime.send(frames.ping(7002))
    idle = frames.parse_pong(runtime.until("pong", 7002))["stats"]
    assert (idle["running"], idle["waiting"], idle["kv_cache_usage"]) == (0, 0, 0.0), idle
    assert idle["prefix_cache_queries"] >= busy["prefix_cache_queries"]


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_abort_and_deadline(vllm_runtime: Any) -> None:
    runtime, _ = vllm_runtime
    others = [runtime.submit(_req(f"other {i}", max_tokens=200)) for i in range(32)]
    victim = runtime.submit(_req("to be cancelled", max_tokens=200), stream=True)
    late = runtime.submit(_req("too slow", max_tokens=200), deadline=time.time() + 0.3)
    runtime.until("partial", victim)
    runtime.send(frames.abort(victim))
    assert runtime.outcome(victim)["code"] == "aborted"
    assert runtime.outcome(late)["code"] == "deadline"
    assert all(runtime.outcome(i)["t"] == "done" for i in others)


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
async def test_vllm_through_the_supervisor(docker_client: Any, tmp_path: Path) -> None:
    """The agent's side on real vLLM: a short job overtakes a running long one, streamed
    tokens are the result's, a cancelled job is aborted in the engine while the others
    finish, and a deadline mid-run ends a job with `DeadlineExceeded`."""
    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = tiny_llama(tmp_path, image_id)
    settings = make_settings(
        tmp_path,
        runtime_backend="docker",
        runtime_memory="6g",
        runtime_ready_timeout_s=600,
        request_timeout_s=600,
    )
    launch = LaunchSpec("vllm", image_id, model.directory, model.sha256, {})
    backend = DockerBackend(
        settings, node_id="test-vllm-" + secrets.token_hex(4), client=docker_client
    )

    def job(job_id: str, max_tokens: int, **kw: Any) -> WorkItem:
        return WorkItem(job_id, _req(f"{job_id} begins", max_tokens=max_tokens), **kw)

    async with Supervisor(settings, backend, launch) as sup:
        parts: list[Partial] = []
        streaming = asyncio.Event()

        def sink(part: Partial) -> None:
            parts.append(part)
            streaming.set()

        long = asyncio.ensure_future(sup.generate(job("long", 200, stream=True), sink))
        await streaming.wait()
        short = await sup.generate(job("short", 4))
        assert not long.done() and len(short.token_ids) <= 4
        done = await long
        assert [t for p in parts for t in p.token_ids] == done.token_ids[
            : sum(len(p.token_ids) for p in parts)
        ]

        others = [asyncio.ensure_future(sup.generate(job(f"o{i}", 100))) for i in range(8)]
        streaming.clear()
        victim = asyncio.ensure_future(sup.generate(job("victim", 200, stream=True), sink))
        await streaming.wait()
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        with pytest.raises(DeadlineExceeded):
            await sup.generate(job("late", 200, deadline=time.time() + 0.2))
        assert all(isinstance(o, Completion) for o in await asyncio.gather(*others))
        assert sup.stats().restarts == 0 and sup.stats().aborting == 0
