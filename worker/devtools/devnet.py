"""`resultity-node dev`: the whole network on one machine, for a first signed result.

It plays both sides. As the network: an embedded nats-server, an authority key, the
streams, a model in the object store (the demo model, or the user's `--model DIR`) with
validation vectors from a reference run, a signed snapshot in the config bucket. As the
operator: a node key and the agent itself. Once the node serves, it submits one job as a
client would and prints the verified result; then the node keeps serving until Ctrl-C,
and client commands find it through `client.json` in its home (`worker.devtools.devhome`).

Each step is one line on the `STEP_LOGGER` logger, with its duration: the console of a
quiet `dev` shows those and warnings only.
"""

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from schemas.envelope import EnvelopeType
from schemas.job import MODEL_ID_PATTERN, Prompted
from schemas.node import NodeState
from schemas.snapshot import ModelSpec, Snapshot
from worker.client import Outcome, connect, new_job_id, submit
from worker.core.credentials import connect_options
from worker.core.errors import NodeError
from worker.core.gcpolicy import tune_for_serving
from worker.core.logs import STEP_LOGGER
from worker.core.registry import publish_record, sign_admission
from worker.core.roles import Role
from worker.core.settings import Settings
from worker.core.signing import NodeKey, load_key_file, write_key_file
from worker.devtools.demomodel import ModelKind, make_demo_model, write_archive
from worker.devtools.devauth import DevCredentials, ensure_dev_credentials
from worker.devtools.devhome import make_home, remove_client_file, write_client_file
from worker.devtools.images import BuildStep, ensure_image_async
from worker.devtools.natsd import NatsServer
from worker.jobs.provision import ensure_streams, provision
from worker.models.objectstore import put_file
from worker.models.store import ModelStore
from worker.node.agent import Agent, handle_signals
from worker.node.snapshots import config_bucket, publish_snapshot
from worker.node.validation import token_ids_sha256
from worker.runtime.api import Completion, LaunchSpec, WorkItem
from worker.runtime.supervisor import Supervisor, create_backend

log = logging.getLogger(__name__)
steps = logging.getLogger(STEP_LOGGER)

DEMO_PROMPTS = ("The node signs", "Resultity runs jobs")
DEMO_PARAMS = {"max_tokens": 12, "temperature": 0}
DEMO_CHAT = [{"role": "user", "content": "Who signs the results?"}]


@dataclass(frozen=True)
class DevPlan:
    home: Path
    port: int
    engine: str  # echo | vllm
    backend: str  # docker | process
    prompt: str
    model_dir: Path | None = None
    """A Hugging Face model directory to serve instead of the demo model."""
    more_model_dirs: tuple[Path, ...] = ()
    """More model directories (`dev --model A --model B`): the node's loadout holds them
    all, one runtime at a time, and switches between them on demand."""
    on_build_step: BuildStep | None = None
    """Told each step of a runtime image build (from a worker thread)."""

    gateway_port: int | None = None  # the OpenAI gateway on 127.0.0.1:<port>; None: none
    vectors_dir: Path | None = None
    """Where reference-run validation vectors are kept (by model, image and engine); None:
    the home. The tests of one session share one: a vLLM reference run is a runtime start."""
    metrics_port: int | None = None  # Prometheus metrics on 127.0.0.1:<port>; None: none


class Step:
    """One step of the dev start: `done(text)` logs it on the step logger with its time."""

    def __init__(self, announce: str | None = None) -> None:
        self.started = time.monotonic()
        if announce is not None:
            steps.info("%8s  %s ...", "", announce)

    def done(self, text: str) -> None:
        steps.info("%7.1fs  %s", time.monotonic() - self.started, text)


def result_note(plan: DevPlan) -> str | None:
    """What to say next to the demo result, so that nobody takes the demo text for a bug."""
    if plan.model_dir is not None:
        return None
    if plan.engine == "vllm":
        return (
            "note: the demo model has random weights (made here, never trained), so its text "
            "is noise; what counts is the signed, verified result. To serve a real model: "
            "resultity-node dev --model DIR"
        )
    return "note: the echo engine runs no model; it answers with words derived from the input"


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


def choose(engine: str, backend: str, model_dir: Path | None = None) -> tuple[str, str]:
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
        if model_dir is not None:
            engine = "vllm"
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


async def _image_for(plan: DevPlan) -> str:
    if plan.backend != "docker":
        return "sha256:" + hashlib.sha256(f"process:{plan.engine}".encode()).hexdigest()
    image = "vllm-cpu" if plan.engine == "vllm" else "echo"
    step = Step(
        f"image: the {image} runtime (built once per recipe; the first build takes minutes)"
    )
    found = await ensure_image_async(image, on_step=plan.on_build_step)
    step.done(f"image: {image} runtime {found[:19]}")
    return found


@dataclass(frozen=True, slots=True)
class PackedModel:
    id: str
    archive: Path
    sha256: str
    size: int


def model_id_for(directory: Path) -> str:
    """A model id (`MODEL_ID_PATTERN`) from a model directory's name."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", directory.resolve().name).strip("-")[:64]
    if not re.match(MODEL_ID_PATTERN, name):
        raise NodeError(f"cannot make a model id from the directory name {directory.name!r}")
    return name


def check_model_dir(directory: Path) -> None:
    """A Hugging Face model directory: a config, a tokenizer and safetensors weights."""
    if not directory.is_dir():
        raise NodeError(f"--model {directory}: not a directory")
    missing = [
        what
        for what, patterns in (
            ("config.json", ("config.json",)),
            ("a tokenizer", ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")),
            ("*.safetensors weights", ("*.safetensors",)),
        )
        if not any(any(directory.glob(p)) for p in patterns)
    ]
    if missing:
        raise NodeError(
            f"--model {directory}: not a Hugging Face model directory (missing "
            f"{', '.join(missing)})"
        )


async def _model(plan: DevPlan, model_dir: Path | None) -> PackedModel:
    """A model to serve (the demo model without `model_dir`), packed as the network
    distributes models."""
    step = Step()
    if model_dir is not None:
        check_model_dir(model_dir)
        model_id = model_id_for(model_dir)
        archive = plan.home / "models" / f"{model_id}.tar"
        sha256 = await asyncio.to_thread(write_archive, model_dir, archive)
        packed = PackedModel(model_id, archive, sha256, archive.stat().st_size)
        what = f"from {model_dir}"
    else:
        kind: ModelKind = "llama" if plan.engine == "vllm" else "echo"
        demo = await asyncio.to_thread(make_demo_model, plan.home / "models", kind)
        model_id = "tiny-llama" if kind == "llama" else "echo-demo"
        packed = PackedModel(model_id, demo.archive, demo.sha256, demo.size)
        what = "demo, random weights" if kind == "llama" else "demo blob for the echo engine"
    step.done(
        f"model {packed.id} ({what}): {packed.size / 1e6:.1f} MB, sha256 {packed.sha256[:16]}..."
    )
    return packed


def has_chat_template(model_dir: Path | None) -> bool:
    """Whether a chat vector can be made: the demo model ships a template; a user's model
    directory only when its tokenizer_config.json names one."""
    if model_dir is None:
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


async def _expected_vectors(
    settings: Settings, launch: LaunchSpec, cache: Path, *, chat: bool = True
) -> list[dict[str, Any]]:
    """Validation vectors for the demo model: a reference run, as the network would author
    them, cached per model and image."""
    flavour = "chat" if chat else "plain"
    key = hashlib.sha256(
        f"{launch.model_sha256}\0{launch.image}\0{launch.engine}\0{flavour}".encode()
    )
    path = cache / f"vectors-{key.hexdigest()[:16]}.json"
    if path.exists():
        cached: list[dict[str, Any]] = json.loads(path.read_text())
        Step().done(f"validation vectors: {len(cached)} (cached from an earlier reference run)")
        return cached
    step = Step(f"validation vectors: reference run of {len(DEMO_PROMPTS)} prompts")

    inputs: list[dict[str, Any]] = [{"prompt": p} for p in DEMO_PROMPTS]
    if chat:
        inputs.append({"messages": DEMO_CHAT})
    items = [
        WorkItem(
            f"vector-{i}", Prompted.model_validate({**given, "params": DEMO_PARAMS}).request_item()
        )
        for i, given in enumerate(inputs)
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
        vectors.append({**item.request, "expected_sha256": token_ids_sha256(outcome.token_ids)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vectors, indent=2))
    step.done(f"validation vectors: {len(vectors)} from the reference run")
    return vectors


async def seed_network(
    settings: Settings,
    authority: NodeKey,
    plan: DevPlan,
    *,
    version: int | None = None,
    image: str | None = None,
) -> Snapshot:
    """Provision, upload the plan's models and publish a signed snapshot naming them (and
    `image`, or the runtime image built here for the plan's engine)."""

    image = image or await _image_for(plan)
    runtime: dict[str, Any] = {
        "name": f"{plan.engine}-demo",
        "image": image,
        "engine": plan.engine,
        "engine_args": {},
    }
    nc = await nats.connect(settings.nats_url.split(","), **connect_options(settings))
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        specs = []
        for model_dir in (plan.model_dir, *plan.more_model_dirs):
            model = await _model(plan, model_dir)
            specs.append(await _publish_model(settings, js, plan, runtime, model, model_dir))
        # The job consumers too: a node may pull from them, never create one.
        await provision(js, settings, [spec["id"] for spec in specs])
        body = {
            "network": settings.network,
            "version": version or int(time.time()),
            "issued_at": time.time(),
            "runtime": runtime,
            "models": specs,
        }
        snapshot = Snapshot.model_validate(body)
        envelope = authority.sign(EnvelopeType.CONFIG, body)
        await publish_snapshot(nc, config_bucket(settings), envelope)
        log.info(
            "dev_snapshot_published version=%d models=%s",
            snapshot.version,
            ",".join(m.id for m in snapshot.models),
        )
        Step().done(f"snapshot v{snapshot.version} signed by the authority key and published")
        return snapshot
    finally:
        await nc.close()


async def _publish_model(
    settings: Settings,
    js: Any,
    plan: DevPlan,
    runtime: dict[str, Any],
    model: PackedModel,
    model_dir: Path | None,
) -> dict[str, Any]:
    """Upload one model and author its spec, validation vectors included."""
    step = Step()
    name = f"{model.id}-{model.sha256[:12]}"
    await put_file(js, settings.models_bucket, name, model.archive)
    step.done(f"model published to the object store bucket {settings.models_bucket}")
    spec: dict[str, Any] = {
        "id": model.id,
        "version": "1",
        "sha256": model.sha256,
        "size": model.size,
        "source": f"nats-object://{settings.models_bucket}/{name}",
        "validation": [],
    }
    model_spec = ModelSpec.model_validate(spec)
    prepared = await ModelStore(settings.cache_dir / "reference", js=js).prepare(model_spec)
    launch = LaunchSpec(plan.engine, runtime["image"], prepared, model.sha256, {})
    spec["validation"] = await _expected_vectors(
        settings, launch, plan.vectors_dir or plan.home, chat=has_chat_template(model_dir)
    )
    return spec


async def run_dev(plan: DevPlan, *, on_result: Any, serve_forever: bool = True) -> Outcome:
    """Start everything, print one verified result through `on_result`, serve until stopped."""
    make_home(plan.home)
    step = Step()
    credentials = await asyncio.to_thread(ensure_dev_credentials, plan.home)
    server = NatsServer(
        plan.home / "nats",
        port=plan.port or -1,
        sync_always=True,
        tls=credentials.tls,
        authorization=credentials.authorization(Settings()),
    )
    await asyncio.to_thread(server.start)
    step.done(
        f"NATS up at {server.url} (TLS with the local CA {credentials.tls.ca}, a user per "
        f"role; JetStream store {plan.home / 'nats'})"
    )
    try:
        step = Step()
        node_key = _key(plan.home / "node.key")
        authority = _key(plan.home / "authority.key")
        step.done(
            f"keys: node {node_key.node_id[:16]}..., authority {authority.node_id[:16]}... "
            f"(in {plan.home})"
        )
        network = Settings(
            nats_url=server.url,
            key_file=plan.home / "node.key",
            authority_keys=(authority.node_id,),
            cache_dir=plan.home / "cache",
            state_dir=plan.home / "state",
            runtime_backend=plan.backend,
            runtime_memory="4g",
            request_timeout_s=300,
            shutdown_grace_s=10,
            metrics_port=plan.metrics_port,
            metrics_host="127.0.0.1",
        )
        settings = credentials.settings_for(network, Role.NODE)
        log.info("dev_nats url=%s store=%s", server.url, plan.home / "nats")
        authority_settings = credentials.settings_for(network, Role.AUTHORITY)
        snapshot = await seed_network(authority_settings, authority, plan)
        await admit_node(authority_settings, authority, node_key.node_id)
        client = credentials.settings_for(network, Role.CLIENT)
        try:
            async with _gateway(
                credentials.settings_for(network, Role.GATEWAY), plan.gateway_port, credentials
            ) as gateway_url:
                api_key = credentials.api_key() if gateway_url is not None else None
                write_client_file(plan.home, client, node_key.node_id, gateway_url, api_key)
                return await _serve(
                    settings, client, node_key, snapshot, plan, on_result, serve_forever
                )
        finally:
            remove_client_file(plan.home)
    finally:
        await asyncio.to_thread(server.stop)


async def admit_node(settings: Settings, authority: NodeKey, node_id: str) -> None:
    """Sign the node's admission to the settings' network into the registry, as the
    network's authority does for an operator who joins."""
    nc = await connect(settings)
    try:
        await publish_record(
            nc, settings, node_id, sign_admission(authority, node_id, settings.network)
        )
    finally:
        await nc.close()
    Step().done(f"node {node_id[:16]}... admitted to {settings.network} (signed registry record)")


@contextlib.asynccontextmanager
async def _gateway(
    settings: Settings, port: int | None, credentials: DevCredentials | None = None
) -> AsyncIterator[str | None]:
    """The OpenAI-compatible gateway in front of the dev network, if asked for; yields its
    OpenAI base URL (`http://h:p/v1`), or None."""
    if port is None:
        yield None
        return
    from worker.gateway.app import running  # the optional `gateway` extra

    async with contextlib.AsyncExitStack() as stack:
        url: str | None = None
        try:
            url = await stack.enter_async_context(running(settings, host="127.0.0.1", port=port))
            log.info("dev_gateway url=%s/v1 (OpenAI API)", url)
            if credentials is not None:
                steps.info(
                    "%8s  gateway %s/v1, API key %s (in %s; try: curl -H 'Authorization: Bearer "
                    "<key>' %s/v1/models)",
                    "",
                    url,
                    credentials.api_key(),
                    credentials.api_keys_file,
                    url,
                )
        except OSError as exc:
            log.warning("dev_gateway_unavailable port=%d error=%s: pass --gateway-port", port, exc)
        yield f"{url}/v1" if url is not None else None


async def _serve(
    settings: Settings,
    client: Settings,
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
    step = Step(f"node {key.node_id[:16]}...: fetching the model, loading the runtime")
    async with agent:
        tune_for_serving()
        serving = asyncio.create_task(agent.serve(stop))
        try:
            settled = asyncio.create_task(
                agent.wait_until(
                    lambda: agent.node_state in (NodeState.SERVING, NodeState.OUT_OF_SERVICE)
                )
            )
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([settled, serving, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (settled, stopped):
                    waiter.cancel()
                await asyncio.gather(settled, stopped, return_exceptions=True)
            if agent.node_state is NodeState.OUT_OF_SERVICE:
                raise NodeError(
                    f"the node took {snapshot.models[0].id} out of service (the "
                    "out_of_service warning above says why)"
                )
            if agent.node_state is NodeState.SERVING:
                step.done(f"node serving {snapshot.models[0].id} (runtime loaded, validated)")
                step = Step()
                nc = await connect(client)
                try:
                    job = {
                        "job_id": new_job_id(),
                        "model_id": snapshot.models[0].id,
                        "prompt": plan.prompt,
                        "params": {"max_tokens": 16, "seed": 1},
                    }
                    outcome = await submit(nc, client, job, wait_s=300)
                finally:
                    await nc.close()
                step.done("first result: signed by the node, verified here")
                on_result(outcome)
            if not serve_forever:
                stop.set()
            await serving
        finally:
            stop.set()
            if not serving.done():
                serving.cancel()
        step = Step("stopping: jobs in flight, the runtime container")
    step.done("node stopped")
    if outcome is None:
        raise NodeError("the dev node stopped before it served the demo job; see the log")
    return outcome
