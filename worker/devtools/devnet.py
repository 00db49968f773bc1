"""`resultity-node dev`: the whole network on one machine, for a first signed result.

It plays both sides. As the network: an embedded nats-server, an authority key, the
streams, the demo model in the object store, a signed snapshot in the config bucket. As the
operator: a node key and the agent itself. Once the node serves, it submits one job as a
client would and prints the verified result; then the node keeps serving until Ctrl-C.
"""

import asyncio
import hashlib
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from schemas.envelope import EnvelopeType
from schemas.snapshot import Snapshot
from worker.client import Outcome, new_job_id, submit
from worker.core.errors import NodeError
from worker.core.settings import Settings
from worker.core.signing import NodeKey, load_key_file, write_key_file
from worker.devtools.demomodel import make_demo_model
from worker.devtools.images import ensure_image_async
from worker.devtools.natsd import NatsServer
from worker.jobs.provision import ensure_streams
from worker.models.objectstore import put_file
from worker.models.store import ModelStore
from worker.node.agent import Agent, AgentState, handle_signals
from worker.node.snapshots import config_bucket, publish_snapshot
from worker.node.validation import token_ids_sha256
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.supervisor import Supervisor, create_backend

log = logging.getLogger(__name__)

DEMO_PROMPTS = ("The node signs", "Resultity runs jobs")
DEMO_PARAMS = {"max_tokens": 12, "temperature": 0}


@dataclass(frozen=True)
class DevPlan:
    home: Path
    port: int
    engine: str  # echo | vllm
    backend: str  # docker | process
    prompt: str


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def choose(engine: str, backend: str) -> tuple[str, str]:
    """Pick the engine and backend, saying why."""
    if backend == "auto":
        backend = "docker" if docker_answers() else "process"
        if backend == "process":
            log.warning(
                "dev_backend backend=process: no Docker engine answers, so the runtime runs as "
                "a local process WITHOUT isolation (start dockerd for the real thing)"
            )
    if engine == "auto":
        engine = "vllm" if backend == "docker" or _vllm_importable() else "echo"
    if engine == "vllm" and backend == "process" and not _vllm_importable():
        raise NodeError(
            "the vllm engine needs Docker (the vllm-cpu image) or vllm installed here; "
            "start dockerd or use --engine echo"
        )
    log.info("dev_choice engine=%s backend=%s", engine, backend)
    return engine, backend


def _vllm_importable() -> bool:

    return importlib.util.find_spec("vllm") is not None


def _key(path: Path) -> NodeKey:
    return load_key_file(path) if path.exists() else write_key_file(path)


async def _image_for(engine: str, backend: str) -> str:
    if backend != "docker":
        return "sha256:" + hashlib.sha256(f"process:{engine}".encode()).hexdigest()

    return await ensure_image_async("vllm-cpu" if engine == "vllm" else "echo")


async def _demo_model(home: Path, engine: str) -> tuple[Path, str, int]:

    if engine == "vllm":
        model = await asyncio.to_thread(make_demo_model, home / "models", "llama")
    else:
        model = await asyncio.to_thread(make_demo_model, home / "models", "echo")
    return model.archive, model.sha256, model.size


async def _expected_vectors(
    settings: Settings, launch: LaunchSpec, cache: Path
) -> list[dict[str, Any]]:
    """Validation vectors for the demo model: a reference run, as the network would author
    them, cached per model and image."""
    key = hashlib.sha256(f"{launch.model_sha256}\0{launch.image}\0{launch.engine}".encode())
    path = cache / f"vectors-{key.hexdigest()[:16]}.json"
    if path.exists():
        cached: list[dict[str, Any]] = json.loads(path.read_text())
        return cached

    items = [
        WorkItem(f"vector-{i}", {"prompt": p, "params": DEMO_PARAMS})
        for i, p in enumerate(DEMO_PROMPTS)
    ]
    log.info("dev_reference_run engine=%s: computing validation vectors", launch.engine)
    async with Supervisor(
        settings, create_backend(settings, node_id="dev-reference"), launch
    ) as sup:
        outcomes = await sup.run(items)
    vectors = []
    for item, outcome in zip(items, outcomes, strict=True):
        if not isinstance(outcome, Completion):
            raise NodeError(f"reference run of the demo model failed: {outcome}")
        vectors.append(
            {
                "prompt": item.payload["prompt"],
                "params": DEMO_PARAMS,
                "expected_sha256": token_ids_sha256(outcome.token_ids),
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vectors, indent=2))
    return vectors


async def seed_network(
    settings: Settings,
    authority: NodeKey,
    plan: DevPlan,
    *,
    version: int | None = None,
    image: str | None = None,
) -> Snapshot:
    """Provision, upload the demo model and publish a signed snapshot naming it (and `image`,
    or the runtime image built here for the plan's engine)."""

    archive, sha256, size = await _demo_model(plan.home, plan.engine)
    image = image or await _image_for(plan.engine, plan.backend)
    model_id = "tiny-llama" if plan.engine == "vllm" else "echo-demo"
    nc = await nats.connect(settings.nats_url.split(","))
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await put_file(js, settings.models_bucket, f"{model_id}-{sha256[:12]}", archive)
        source = f"nats-object://{settings.models_bucket}/{model_id}-{sha256[:12]}"
        spec: dict[str, Any] = {
            "id": model_id,
            "version": "1",
            "sha256": sha256,
            "size": size,
            "source": source,
            "validation": [],
        }
        runtime: dict[str, Any] = {
            "name": f"{plan.engine}-demo",
            "image": image,
            "engine": plan.engine,
            "engine_args": {},
        }
        model_spec = Snapshot.model_validate(
            {"version": 1, "issued_at": 0.0, "runtime": runtime, "models": [spec]}
        ).models[0]
        model_dir = await ModelStore(settings.cache_dir / "reference", js=js).prepare(model_spec)
        launch = LaunchSpec(plan.engine, image, model_dir, sha256, {})
        spec["validation"] = await _expected_vectors(settings, launch, plan.home)
        body = {
            "version": version or int(time.time()),
            "issued_at": time.time(),
            "runtime": runtime,
            "models": [spec],
        }
        snapshot = Snapshot.model_validate(body)
        envelope = authority.sign(EnvelopeType.CONFIG, body)
        await publish_snapshot(nc, config_bucket(settings), envelope)
        log.info("dev_snapshot_published version=%d model=%s", snapshot.version, model_id)
        return snapshot
    finally:
        await nc.close()


async def run_dev(plan: DevPlan, *, on_result: Any, serve_forever: bool = True) -> Outcome:
    """Start everything, print one verified result through `on_result`, serve until stopped."""
    plan.home.mkdir(parents=True, exist_ok=True)
    node_key = _key(plan.home / "node.key")
    authority = _key(plan.home / "authority.key")
    server = NatsServer(plan.home / "nats", port=plan.port or -1, sync_always=True)
    await asyncio.to_thread(server.start)
    try:
        settings = Settings(
            nats_url=server.url,
            key_file=plan.home / "node.key",
            authority_keys=(authority.node_id,),
            cache_dir=plan.home / "cache",
            state_dir=plan.home / "state",
            runtime_backend=plan.backend,
            runtime_memory="4g",
            request_timeout_s=300,
            shutdown_grace_s=10,
        )
        log.info("dev_nats url=%s store=%s", server.url, plan.home / "nats")
        snapshot = await seed_network(settings, authority, plan)
        return await _serve(settings, node_key, snapshot, plan, on_result, serve_forever)
    finally:
        await asyncio.to_thread(server.stop)


async def _serve(
    settings: Settings,
    key: NodeKey,
    snapshot: Snapshot,
    plan: DevPlan,
    on_result: Any,
    serve_forever: bool,
) -> Outcome:
    stop = asyncio.Event()
    agent = Agent(settings, key)
    handle_signals(agent, stop)
    outcome: Outcome | None = None
    async with agent:
        serving = asyncio.create_task(agent.serve(stop))
        try:
            while agent.state is not AgentState.SERVING:
                if serving.done() or stop.is_set():
                    break
                if agent.state is AgentState.OUT_OF_SERVICE:
                    raise NodeError("the node took the demo model out of service; see the log")
                await asyncio.sleep(0.2)
            if agent.state is AgentState.SERVING:
                nc = await nats.connect(settings.nats_url.split(","))
                try:
                    job = {
                        "job_id": new_job_id(),
                        "model_id": snapshot.models[0].id,
                        "prompt": plan.prompt,
                        "params": {"max_tokens": 16, "seed": 1},
                    }
                    outcome = await submit(nc, settings, job, wait_s=300)
                finally:
                    await nc.close()
                on_result(outcome)
            if not serve_forever:
                stop.set()
            await serving
        finally:
            stop.set()
            if not serving.done():
                serving.cancel()
    if outcome is None:
        raise NodeError("the dev node stopped before it served the demo job; see the log")
    return outcome
