"""The agent: connects to NATS, follows signed snapshots, keeps one runtime, runs the pipeline.

Agent (an AsyncResource); its state is one `Lifecycle` record (worker.node.lifecycle)
replaced whole by a pure `step`, so state, snapshot, model and model states never disagree
├── NATS connection (reconnects forever; pull requests are re-issued after a reconnect)
├── ConfigWatcher  --verified snapshot, now in force-->  apply()
│                                   ├── loadout (worker.node.loadout); nothing that runs
│                                   │   changes: applied in place, no job cut
│                                   ├── prepare: ModelStore.fetch / prepare, image check
│                                   │   (nothing running is touched until this succeeds)
│                                   ├── switch: drain with a grace, prune, Supervisor.replace
│                                   ├── validation vectors
│                                   ├── Pipeline for the loaded model
│                                   └── prefetch the rest of the loadout, evict past budget
│       a failed prepare or switch: serve nothing under the snapshot in force, remove
│       what it does not list, retry with backoff until it works or a newer one comes
├── demand: switch to another model of the loadout when its jobs wait (Switcher decides),
│   under a switch claim (worker.node.claims) so two nodes never switch to one model at once
├── heartbeat, status endpoint (worker.node.services), periodic validation, metrics
└── shutdown sequence (see `_close`)
"""

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import ServiceUnavailableError

from schemas.event import ErrorCode, LifecycleKind
from schemas.node import ModelState, NodeState, NodeStatus, StatusReply, ValidationState
from schemas.snapshot import ModelSpec, Snapshot
from worker.core.credentials import connect_options, require_tls
from worker.core.errors import (
    ModelInvalid,
    NodeError,
    NotAdmitted,
    ResourceClosed,
    RuntimeFailure,
    error_code,
)
from worker.core.gcpolicy import tune_for_serving
from worker.core.metrics import Metrics, MetricsServer
from worker.core.progress import ProgressReport
from worker.core.registry import AdmittedNodes, read_record
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.provision import consumer_name, ensure_consumer, ensure_streams
from worker.jobs.publisher import Publisher
from worker.models.store import ModelLimits, ModelStore
from worker.node import lifecycle as lc
from worker.node import status as node_status
from worker.node.claims import SwitchClaims
from worker.node.inventory import HardwareMonitor
from worker.node.lifecycle import Lifecycle
from worker.node.loadout import Loadout, Queue, Switcher, choose_loadout
from worker.node.services import heartbeat_loop, status_endpoint
from worker.node.snapshots import AcceptedSnapshot, ConfigWatcher
from worker.node.validation import validate_model
from worker.runtime.api import LaunchSpec
from worker.runtime.hardware import CPU_CLASS, no_class_reason, node_execution_class
from worker.runtime.imagepin import ensure_image
from worker.runtime.supervisor import Supervisor, create_backend

log = logging.getLogger(__name__)

VALIDATION_ATTEMPTS = 3

STARTUP_PROVISION_ATTEMPTS = 12

APPLY_RETRY_MAX_S = 600.0
CLAIM_PULL_WAIT_S = 10.0
"""How long a node that switched on demand waits for its first pull on the new model
before releasing its claim anyway (the pull is normally out at once)."""

AgentState = NodeState
"""The node's state (`Agent.node_state`), as its heartbeat and status reply say it."""


class Agent(AsyncResource):
    """One node. `async with Agent(...) as agent: await agent.serve(stop)`."""

    def __init__(self, settings: Settings, key: NodeKey) -> None:
        super().__init__()
        self.settings = settings
        self.key = key
        self.metrics = Metrics()
        self._life = Lifecycle()
        self.admitted: bool | None = None
        """Whether the node registry admits this node (None: not asked, or not required)."""
        self._state_changed = asyncio.Event()
        self.started_at = time.time()
        self.config_hash: str | None = None
        """SHA-256 of the signed envelope of the snapshot in force (heartbeat, status)."""
        self.hardware: HardwareMonitor | None = None
        self.last_heartbeat_at: float | None = None
        self.pipeline: Pipeline | None = None
        self.completed_before = 0
        self._nc: Client | None = None
        self._publisher: Publisher | None = None
        self._supervisor: Supervisor | None = None
        self._runtime_stack: AsyncExitStack | None = None
        self._launched: LaunchSpec | None = None
        """What the runtime in service was started from."""
        self._pipeline_stack: AsyncExitStack | None = None
        self._store: ModelStore | None = None
        self._claims: SwitchClaims | None = None
        self._apply_lock = asyncio.Lock()
        self._forced = False
        self.force = asyncio.Event()
        # A snapshot in force whose apply failed, retried by `_retry_loop` with backoff.
        self._retry_wanted = asyncio.Event()
        self._retry_delay_s = settings.apply_retry_s
        self.execution_class = CPU_CLASS
        """This node's execution class (worker.runtime.hardware), found at each apply."""
        # Failures found inside the pipeline's own tasks; handled by `_trouble_loop`, since
        # the pipeline cannot drain itself from within.
        self._troubles: asyncio.Queue[ModelInvalid] = asyncio.Queue()
        # Model state changes, announced as lifecycle events by `_announce_loop` in order.
        self._model_changes: asyncio.Queue[lc.ModelEntry] = asyncio.Queue()
        self._budget = settings.cache_budget_bytes
        # The starvation wait is jittered per node, so that two nodes seeing the same
        # starved model do not both switch to it at the same moment.
        self._switcher = Switcher(
            min_residency_s=settings.switch_min_residency_s,
            starve_s=max(settings.switch_min_residency_s, 4 * settings.switch_check_interval_s)
            * random.uniform(1.0, 1.5),
        )
        self.switches = 0
        """Switches on demand from one model of the loadout to another."""
        self.metrics.collect = self._collect_metrics

    # state

    @property
    def lifecycle(self) -> Lifecycle:
        """The node's state, snapshot in force and model in service, as one record."""
        return self._life

    @property
    def node_state(self) -> NodeState:
        return self._life.state

    @property
    def snapshot(self) -> Snapshot | None:
        return self._life.snapshot

    @property
    def model(self) -> ModelSpec | None:
        return self._life.model

    @property
    def validation_state(self) -> ValidationState:
        return self._life.validation

    def _move(self, event: lc.Event) -> Lifecycle:
        """Replace the lifecycle record by its successor: one step, no await, so that no
        reader sees half of a change."""
        before, self._life = self._life, lc.step(self._life, event)
        if self._life.models != before.models:
            for entry in self._life.models:
                if entry not in before.models:
                    self._model_changes.put_nowait(entry)
        if self._life.state is not before.state:
            log.info(
                "node_state state=%s was=%s reason=%s",
                self._life.state.value,
                before.state.value,
                self._life.reason,
            )
        self._wake_waiters()
        return self._life

    def _wake_waiters(self) -> None:
        """`wait_until` callers check their condition again."""
        changed, self._state_changed = self._state_changed, asyncio.Event()
        changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds; it is checked at every change of state.
        Raises `ResourceClosed` if the agent stops first."""
        while not condition():
            if self.node_state in (NodeState.STOPPING, NodeState.CLOSED):
                raise ResourceClosed(f"agent is {self.node_state.value}")
            await self._state_changed.wait()

    async def wait_serving(self, config_version: int = 0) -> None:
        """Return once the node serves jobs under a snapshot of at least `config_version`."""

        def serving() -> bool:
            pipeline = self.pipeline
            return (
                self.node_state is NodeState.SERVING
                and pipeline is not None
                and pipeline.serving.config_version >= config_version
            )

        await self.wait_until(serving)

    # lifecycle

    async def _open(self, stack: AsyncExitStack) -> None:
        self._move(lc.Starting())
        # A runtime left by a previous agent of this node (killed, not stopped) goes first:
        # this agent may be stopped again before it ever starts a supervisor of its own.
        await self._remove_leftover_runtimes()
        require_tls(self.settings)
        self._nc = await nats.connect(
            self.settings.nats_url.split(","),
            **connect_options(self.settings),
            name=f"resultity-node {self.key.node_id[:12]}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            reconnected_cb=self._on_reconnected,
            disconnected_cb=self._on_disconnected,
            error_cb=self._on_error,
        )
        stack.push_async_callback(self._close_nats)
        # Unwound before NATS closes (the stack runs in reverse).
        stack.push_async_callback(self._close_runtime)
        js = self._nc.jetstream()
        self._publisher = Publisher(self._nc, js, self.key, self.settings)
        self._claims = SwitchClaims(self._nc, self.settings, self.key.node_id)
        try:
            await self._claims.clear_mine()
        except Exception as exc:
            log.warning("switch_claims_clear_failed error=%r", exc)
        if self.settings.provision:
            await _provision_at_start(js, self.settings)

        self.hardware = await stack.enter_async_context(
            HardwareMonitor(self.settings.cache_dir, self.settings.heartbeat_interval_s)
        )
        self._store = ModelStore(
            self.settings.cache_dir, js=js, limits=ModelLimits.from_settings(self.settings)
        )
        await self._publisher.try_lifecycle(LifecycleKind.STARTED, version=_version())
        log.info("agent_started node_id=%s network=%s", self.key.node_id, self.settings.network)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._forced = self._forced or exc_type is not None
        await self.aclose()

    async def _close(self) -> None:
        """Shutdown, in this order:

        1. announce `stopping` (best effort) so the network stops expecting work here;
        2. drain the pipeline: stop pulling, finish in-flight jobs for `shutdown_grace_s`
           (0 when forced), nak the rest so another node takes them at once;
        3. close the supervisor: `shutdown` frame, then kill and remove the container,
           so no runtime outlives the agent (the exit stack, after this);
        4. flush and close NATS last, so the acks and naks of step 2 reach the server.
        """
        forced = self._forced or self.force.is_set()
        self._move(lc.Stopping())
        if self._publisher is not None and not forced:
            await self._publisher.try_lifecycle(LifecycleKind.STOPPING)
        await self._stop_pipeline(0 if forced else self.settings.shutdown_grace_s)

    async def _close_runtime(self) -> None:
        if self._runtime_stack is not None:
            await self._stop_runtime()
        else:
            await self._remove_leftover_runtimes()

    async def _close_nats(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), 5)
            except Exception as exc:
                log.warning("nats_drain_failed error=%r", exc)
                await self._nc.close()
        self._move(lc.Closed())
        log.info("agent_stopped node_id=%s", self.key.node_id)

    async def _remove_leftover_runtimes(self) -> None:
        backend = create_backend(self.settings, node_id=self.key.node_id)
        try:
            removed = await backend.remove_leftovers()
        except Exception as exc:
            # No engine now: the first runtime start will say so; nothing to clean anyway.
            log.warning("runtime_leftover_check_failed error=%r", exc)
            return
        finally:
            await backend.aclose()
        if removed:
            log.warning("runtime_leftovers_removed count=%d", removed)

    async def serve(self, stop: asyncio.Event) -> None:
        """Follow snapshots and serve until `stop` is set."""

        self.check_open()
        assert self._nc is not None and self._publisher is not None
        self._move(lc.AwaitingConfig())
        watcher = ConfigWatcher(
            self._nc, self.settings, apply=self._apply_accepted, on_rejected=self._report_rejected
        )
        status_subject = self.settings.subject("nodes", self.key.node_id, "status")
        heartbeats = heartbeat_loop(
            self._publisher, self.node_status, self.settings.heartbeat_interval_s, self._beat
        )
        async with (
            status_endpoint(self._nc, status_subject, self.status),
            watcher,
            asyncio.TaskGroup() as tg,
        ):
            duties = [
                tg.create_task(heartbeats, name="heartbeat"),
                tg.create_task(self._validation_loop(), name="validation"),
                tg.create_task(self._trouble_loop(), name="troubles"),
                tg.create_task(self._retry_loop(), name="apply-retry"),
                tg.create_task(self._announce_loop(), name="model-states"),
                tg.create_task(self._demand_loop(), name="demand"),
                tg.create_task(self._admission_loop(), name="admission"),
            ]
            if self.settings.metrics_port is not None:
                duties.append(tg.create_task(self._metrics_server(stop), name="metrics"))
            await stop.wait()
            for duty in duties:
                duty.cancel()

    # config

    async def _apply_accepted(self, accepted: AcceptedSnapshot) -> None:
        self.config_hash = hashlib.sha256(accepted.envelope).hexdigest()
        await self.apply(accepted.snapshot)

    async def apply(self, snapshot: Snapshot) -> None:
        """Bring `snapshot` (verified: it is in force from now on) into service.

        The node's loadout under it (`worker.node.loadout`) is worked out; when nothing
        that runs changes, the snapshot is applied in place. Otherwise everything the
        model to load needs (fetched and verified, image present, directory prepared) is
        made ready while the old runtime still serves; only then is the old one drained
        and replaced, and the new one validated. The rest of the loadout is prefetched
        into the cache after. When any of that fails, the node serves nothing under this
        snapshot, removes the models it does not list, publishes one error event and
        retries with backoff until it succeeds or a newer snapshot comes; the failure is
        raised too (the watcher logs it). A model whose bytes or validation vectors fail
        is quarantined (failed) and retried the same way.
        """
        async with self._apply_lock:
            if snapshot is not self.snapshot:
                self._retry_delay_s = self.settings.apply_retry_s
            self._retry_wanted.clear()
            # The snapshot as this node's execution class reads it (its runtime, its vectors).
            self.execution_class = await asyncio.to_thread(node_execution_class, self.settings)
            if (resolved := snapshot.for_class(self.execution_class)) is None:
                self._move(lc.InForce(snapshot))
                await self._config_rejected(no_class_reason(snapshot, self.execution_class))
                await self._serve_nothing(snapshot, f"no entry for {self.execution_class}")
                return
            snapshot = resolved
            before = self._life
            life = self._move(lc.InForce(snapshot))
            if life.model is None and self.pipeline is not None:
                # the model in service was revoked: it stops at once, no grace
                await self._stop_pipeline(0)
            try:
                self._budget = await asyncio.to_thread(self._cache_budget)
                loadout = self.loadout()
                if not loadout.models:
                    await self._config_rejected(
                        f"snapshot {snapshot.version}: no approved model is in this node's "
                        f"loadout ({_why_left_out(loadout)}); it serves nothing until one is"
                    )
                    await self._serve_nothing(snapshot, "no model of the loadout approved")
                    return
                await self._check_admitted(loadout)
                if self._runs_already(snapshot, loadout):
                    await self._apply_in_place(snapshot, before)
                else:
                    await self._bring_into_service(snapshot, self._candidates(loadout))
                await self._prefetch(snapshot, loadout)
            except Exception as exc:
                await self._apply_failed(snapshot, exc)
                raise

    async def _apply_failed(self, snapshot: Snapshot, exc: Exception) -> None:
        log.error(
            "apply_failed version=%d error=%r retry_in_s=%.1f",
            snapshot.version,
            exc,
            self._retry_delay_s,
        )
        await self._serve_nothing(snapshot, f"snapshot {snapshot.version}: {exc}")
        # Whatever raised (a NodeError, or a Docker SDK read timeout), the network hears
        # of it once, here, when the node has settled into serving nothing.
        await self._publish_error(exc, retryable=True, context=f"snapshot {snapshot.version}")
        self._retry_wanted.set()

    def loadout(self) -> Loadout:
        """The models this node serves under the snapshot in force."""
        snapshot = self.snapshot
        if snapshot is None:
            return Loadout(())
        wanted = (self.settings.model,) if self.settings.model else self.settings.models
        return choose_loadout(snapshot, wanted, self.key.node_id, self._budget)

    def _cache_budget(self) -> int:
        if self.settings.cache_budget_bytes:
            return self.settings.cache_budget_bytes
        assert self._store is not None
        return shutil.disk_usage(self.settings.cache_dir).free + self._store.cached_bytes()

    def _candidates(self, loadout: Loadout) -> list[ModelSpec]:
        """The models to try loading, in order: the one loaded now if it stays, then the
        others of the loadout, those that failed last."""
        loaded = self._launched.model_sha256 if self._launched else None
        failed = {m.sha256 for m in self._life.models if m.state is ModelState.FAILED}
        return sorted(loadout.models, key=lambda m: (m.sha256 != loaded, m.sha256 in failed))

    def _runs_already(self, snapshot: Snapshot, loadout: Loadout) -> bool:
        """Whether the node serves, under `snapshot`, exactly what runs now: same engine,
        image, engine arguments, and a model of the loadout (same id, version, bytes)."""
        launched, model, pipeline = self._launched, self.model, self.pipeline
        if launched is None or model is None or pipeline is None:
            return False
        if self.node_state is not NodeState.SERVING or model not in loadout.models:
            return False
        runtime = snapshot.runtime
        return (
            (launched.engine, launched.image, launched.model_sha256)
            == (runtime.engine, runtime.image, model.sha256)
        ) and launched.engine_args == dict(runtime.engine_args)

    async def _apply_in_place(self, snapshot: Snapshot, before: Lifecycle) -> None:
        """Nothing this node runs changes: the runtime keeps running and no job is cut; the
        results from now on attest the new snapshot. The vectors run again only if the
        snapshot changed them."""
        assert self._publisher is not None and self.pipeline is not None
        model = self.model
        assert model is not None
        pipeline = self.pipeline
        pipeline.serving = replace(pipeline.serving, config_version=snapshot.version)
        self._wake_waiters()  # `wait_serving` reads the pipeline's snapshot version
        await self._prune(snapshot)
        if before.snapshot is snapshot:
            return  # a retry of this snapshot: only its prefetch failed
        await self._publisher.try_lifecycle(
            LifecycleKind.CONFIG_APPLIED, version=snapshot.version, in_place=True
        )
        log.info("config_applied_in_place version=%d model=%s", snapshot.version, model.id)
        if before.model is None or before.model.validation != model.validation:
            self._gate_on(model)  # a restarted runtime runs the new vectors
            await self._validate()

    async def _bring_into_service(self, snapshot: Snapshot, candidates: list[ModelSpec]) -> None:
        """Load the first candidate that verifies (the others are marked failed)."""
        first_error: NodeError | None = None
        for spec in candidates:
            try:
                model_dir = await self._ready_model(spec)
            except NodeError as exc:
                first_error = first_error or exc
                continue
            await self._switch(snapshot, spec, model_dir, self.settings.switch_grace_s)
            return
        assert first_error is not None
        raise first_error

    async def _ready_model(self, spec: ModelSpec) -> Path:
        """The model fetched, verified and unpacked: its directory for the runtime."""
        assert self._store is not None
        try:
            await self._store.fetch(spec, progress=ProgressReport(spec.size, "model_download"))
            model_dir = await self._store.prepare(spec)
        except Exception as exc:
            self._move(lc.ModelFailed(spec, str(exc)[:512]))
            raise
        self._move(lc.ModelVerified(spec))
        return model_dir

    async def _switch(
        self, snapshot: Snapshot, spec: ModelSpec, model_dir: Path, grace_s: float
    ) -> None:
        """Swap the runtime for one serving `spec` (its directory ready in `model_dir`)."""
        assert self._publisher is not None and self._store is not None
        await self._check_image(snapshot.runtime.image)
        launch = LaunchSpec(
            engine=snapshot.runtime.engine,
            image=snapshot.runtime.image,
            model_dir=model_dir,
            model_sha256=spec.sha256,
            engine_args=dict(snapshot.runtime.engine_args),
            execution_class=self.execution_class,
        )
        # Stop pulling, let the jobs in flight finish up to the grace, hand back the rest
        # (they were not at fault: no error event), then swap.
        previous = self.model
        self._move(lc.Switching())
        await self._stop_pipeline(grace_s)
        stopped_at = time.monotonic()  # the old model's last result is out: no model serves
        await self._prune(snapshot)
        replacing = self._supervisor is not None
        await self._launch(launch)
        self._switcher.loaded(asyncio.get_running_loop().time())
        kind = LifecycleKind.RUNTIME_REPLACED if replacing else LifecycleKind.RUNTIME_STARTED
        await self._publisher.try_lifecycle(kind, image=launch.image, engine=launch.engine)
        await self._publisher.try_lifecycle(LifecycleKind.CONFIG_APPLIED, version=snapshot.version)
        self._move(lc.Loaded(spec))
        await self._store.touch(spec.sha256)
        # Validate, then serve.
        if not await self._validate():
            return
        await self._publisher.try_lifecycle(
            LifecycleKind.MODEL_READY, id=spec.id, version=spec.version, sha256=spec.sha256
        )
        await self._start_pipeline(snapshot, spec)
        if previous is not None and previous.sha256 != spec.sha256:
            self.metrics.model_switched(spec.id, time.monotonic() - stopped_at)

    async def _prefetch(self, snapshot: Snapshot, loadout: Loadout) -> None:
        """Every model of the loadout verified in the cache (and its consumer made), so a
        switch to it costs no download; least recently served models past the budget go."""
        assert self._store is not None and self._nc is not None
        js = self._nc.jetstream()
        for spec in loadout.models:
            entry = self._life.model_state(spec)
            if entry is None or entry.state not in (ModelState.READY, ModelState.ACTIVE):
                try:
                    await self._store.fetch(spec)
                except NodeError as exc:
                    self._move(lc.ModelFailed(spec, str(exc)[:512]))
                    await self._publish_error(exc, retryable=True, context=f"prefetch {spec.id}")
                    self._retry_wanted.set()  # with backoff, like a failed apply
                    continue
                self._move(lc.ModelVerified(spec))
            if self.settings.provision and spec != self.model:
                try:
                    await ensure_consumer(js, self.settings, spec.id)
                except Exception as exc:
                    log.warning("consumer_create_failed model=%s error=%r", spec.id, exc)
        keep = {m.sha256 for m in loadout.models}
        for sha in await self._store.evict(keep, self._budget):
            log.info("model_evicted sha256=%s budget=%d", sha, self._budget)

    async def _check_admitted(self, loadout: Loadout) -> None:
        """Serve only as an admitted node (PROTOCOL.md, "Admitted nodes"): otherwise the
        apply fails and the node serves nothing and says why; `_admission_loop` applies
        again when the registry changes."""
        if not self.settings.admission_required:
            return
        assert self._nc is not None
        record = await read_record(self._nc, self.settings, self.key.node_id)
        self.admitted = record is not None and any(
            record.admits(self.settings.network, time.time(), spec.id) for spec in loadout.models
        )
        if not self.admitted:
            found = "none" if record is None else "revoked, expired or for other models"
            raise NotAdmitted(
                f"node {self.key.node_id} is not admitted to {self.settings.network} for its "
                f"models (registry record: {found}); the network's authority admits it with "
                "'resultity-node admit NODE_ID'"
            )

    async def _admission_loop(self) -> None:
        """Follow the registry: when its word on this node changes (admitted, revoked,
        re-admitted), apply the snapshot in force again, which starts or stops serving."""
        if not self.settings.admission_required:
            return
        assert self._nc is not None
        admitted = AdmittedNodes(self.settings)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(admitted.follow(self._nc), name="registry")
            while True:
                await admitted.changed.wait()
                admitted.changed.clear()
                now = self.key.public_key in admitted
                snapshot = self.snapshot
                if snapshot is not None and self.admitted is not None and now != self.admitted:
                    log.info("admission_changed node_id=%s admitted=%s", self.key.node_id, now)
                    with contextlib.suppress(Exception):  # apply logs and retries its failures
                        await self.apply(snapshot)

    async def _serve_nothing(self, snapshot: Snapshot, why: str) -> None:
        """Under `snapshot`, nothing runs: no pipeline, no runtime, no unlisted model."""
        await self._take_out_of_service(why)
        await self._stop_runtime()
        try:
            await self._prune(snapshot)
        except Exception as exc:
            log.error("model_prune_failed error=%r", exc)

    async def _prune(self, snapshot: Snapshot) -> None:
        assert self._store is not None and self._publisher is not None
        approved = [m.sha256 for m in snapshot.models]
        for removed in await self._store.prune(approved):
            await self._publisher.try_lifecycle(LifecycleKind.MODEL_REMOVED, sha256=removed)

    async def _retry_loop(self) -> None:
        """Re-apply the snapshot in force after a failed apply, with a doubling delay."""
        while True:
            await self._retry_wanted.wait()
            snapshot, delay = self.snapshot, self._retry_delay_s
            await asyncio.sleep(delay)
            if snapshot is not self.snapshot or not self._retry_wanted.is_set():
                continue  # a newer snapshot came meanwhile: its own apply decides
            assert snapshot is not None
            self._retry_delay_s = min(delay * 2, APPLY_RETRY_MAX_S)
            log.info("apply_retry version=%d", snapshot.version)
            try:
                await self.apply(snapshot)
            except Exception:
                pass  # logged by `apply`, which asked for the next retry

    async def _launch(self, launch: LaunchSpec) -> None:
        """Start the one runtime, or replace it; the supervisor removes the old container."""
        self._launched = None

        if self._supervisor is None:
            stack = AsyncExitStack()
            backend = create_backend(self.settings, node_id=self.key.node_id)
            try:
                self._supervisor = await stack.enter_async_context(
                    Supervisor(self.settings, backend, launch)
                )
            except BaseException:
                await stack.aclose()
                raise
            self._runtime_stack = stack
        else:
            await self._supervisor.replace(launch)
        self._launched = launch

    async def _stop_runtime(self) -> None:
        stack, self._runtime_stack = self._runtime_stack, None
        self._supervisor = None
        self._launched = None
        if stack is not None:
            await stack.aclose()

    async def _check_image(self, image: str) -> None:
        if self.settings.runtime_backend != "docker":
            return
        import docker

        client = await asyncio.to_thread(docker.from_env)
        try:
            await ensure_image(client, image)
        finally:
            await asyncio.to_thread(client.close)

    async def _validate(self) -> bool:
        model = self.model
        assert model is not None and self._publisher is not None
        assert self._supervisor is not None
        for attempt in range(1, VALIDATION_ATTEMPTS + 1):
            try:
                await validate_model(self._supervisor, model)
                break
            except ModelInvalid as exc:
                await self._model_invalid(exc)
                return False
            except RuntimeFailure as exc:
                # A runtime that breaks while the vectors run says nothing about the model:
                # the supervisor has started a fresh one, so try again, then give up for now.
                log.warning("validation_runtime_failed try=%d error=%s", attempt, exc)
                if attempt == VALIDATION_ATTEMPTS:
                    self._move(lc.ValidationNotRun())
                    raise
        self._move(lc.Validated())
        await self._publisher.try_lifecycle(
            LifecycleKind.VALIDATION_PASSED, id=model.id, vectors=len(model.validation)
        )
        return True

    async def _model_invalid(self, exc: ModelInvalid) -> None:
        """Quarantined: out of service, its state failed; the snapshot is applied again
        with backoff (a newer snapshot may fix the vectors; the same one may not)."""
        await self._publish_error(exc, retryable=False)
        await self._take_out_of_service(str(exc), invalid=True)
        self._retry_wanted.set()

    async def _take_out_of_service(self, why: str, *, invalid: bool = False) -> None:
        """Say so first (state, model and validation in one step), then stop the pipeline."""
        log.warning("out_of_service reason=%s", why)
        self._move(lc.OutOfService(why, invalid=invalid))
        await self._stop_pipeline(self.settings.shutdown_grace_s)

    async def _start_pipeline(self, snapshot: Snapshot, spec: ModelSpec) -> None:
        assert self._nc is not None and self._publisher is not None
        await ensure_consumer(self._nc.jetstream(), self.settings, spec.id)
        serving = Serving(
            spec.id, spec.version, spec.sha256, snapshot.runtime.image, snapshot.version
        )
        assert self._supervisor is not None
        self._gate_on(spec)
        stack = AsyncExitStack()
        self.pipeline = await stack.enter_async_context(
            Pipeline(
                self._nc, self.settings, self._publisher, self._supervisor, serving, self.metrics
            )
        )
        self._pipeline_stack = stack
        self._move(lc.Serving())
        log.info("serving model=%s version=%s config=%d", spec.id, spec.version, snapshot.version)

    def _gate_on(self, spec: ModelSpec) -> None:
        """After every runtime restart, `spec`'s vectors run again before more work."""
        assert self._supervisor is not None
        self._supervisor.gate(
            functools.partial(validate_model, spec=spec), self._troubles.put_nowait
        )

    async def _stop_pipeline(self, grace_s: float) -> None:
        if self._supervisor is not None:
            self._supervisor.gate(None)
        pipeline, self.pipeline = self.pipeline, None
        stack, self._pipeline_stack = self._pipeline_stack, None
        if pipeline is not None:
            await pipeline.drain(grace_s, abort=self.force)
            self.completed_before += pipeline.completed
        if stack is not None:
            await stack.aclose()  # drained already: this only marks it closed

    async def _report_rejected(self, exc: NodeError) -> None:
        await self._config_rejected(str(exc))

    async def _config_rejected(self, reason: str) -> None:
        assert self._publisher is not None
        log.warning("config_rejected reason=%s", reason)
        try:
            await self._publisher.publish_error(ErrorCode.CONFIG_REJECTED, reason, retryable=False)
        except Exception as exc:
            log.warning("error_publish_failed code=CONFIG_REJECTED error=%r", exc)

    async def _publish_error(
        self, exc: Exception, *, retryable: bool, context: str | None = None
    ) -> None:
        """One signed error event for `exc`: a NodeError's own code, `INTERNAL` for anything
        else (named by its type, since its text alone may say little)."""
        assert self._publisher is not None
        code = error_code(exc)
        message = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"
        if context is not None:
            message = f"{context}: {message}"
        try:
            await self._publisher.publish_error(code, message, retryable=retryable)
        except Exception as pub_exc:
            log.warning("error_publish_failed code=%s error=%r", code.value, pub_exc)

    # background duties

    async def _validation_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.validation_interval_s)
            async with self._apply_lock:
                # looked at under the lock: an apply that held it may have changed the node
                if self.node_state is not NodeState.SERVING or self.model is None:
                    continue
                try:
                    await self._validate()
                except RuntimeFailure as exc:
                    log.warning("periodic_validation_not_run error=%s", exc)

    async def _trouble_loop(self) -> None:
        while True:
            exc = await self._troubles.get()
            async with self._apply_lock:
                if self.node_state is NodeState.SERVING:
                    await self._model_invalid(exc)

    async def _demand_loop(self) -> None:
        """Look at the loadout's queues and switch models on demand (`Switcher` decides)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.switch_check_interval_s)
            life, pipeline = self._life, self.pipeline
            if life.state is not NodeState.SERVING or life.model is None or pipeline is None:
                continue
            # Only a model verified in the cache is a switch target: a pending one is still
            # being fetched, a failed one is quarantined until a retry verifies it.
            loadout = self.loadout()
            usable = [
                spec
                for spec in loadout.models
                if (entry := life.model_state(spec)) is not None
                and entry.state in (ModelState.READY, ModelState.ACTIVE)
            ]
            if len(usable) < 2:
                continue
            queues = await self._queues(usable)
            target = self._switcher.observe(loop.time(), life.model.id, queues, pipeline.in_flight)
            if target is None:
                continue
            async with self._apply_lock:
                spec = loadout.get(target)
                snapshot = self.snapshot
                if self._life is not life or spec is None or snapshot is None:
                    continue  # something changed meanwhile: look again
                # Another node may have decided the same from the same look: the one that
                # claims the model switches, the others keep what they serve.
                # A claim that cannot be made at all (the bucket unreachable or not
                # permitted) does not stop the switch: the jittered wait still spreads nodes.
                assert self._claims is not None
                try:
                    claimed = await self._claims.claim(target)
                except Exception as exc:
                    log.warning("switch_claim_failed model=%s error=%r", target, exc)
                    claimed = None
                if claimed is False:
                    log.info("model_switch_claimed_elsewhere model=%s", target)
                    continue
                try:
                    await self._switch_on_demand(snapshot, spec, life.model.id, queues[target])
                finally:
                    if claimed:
                        await self._release_claim(target)

    async def _switch_on_demand(
        self, snapshot: Snapshot, spec: ModelSpec, loaded: str, queue: Queue
    ) -> None:
        log.info("model_switch from=%s to=%s pending=%d", loaded, spec.id, queue.pending)
        try:
            model_dir = await self._ready_model(spec)
        except Exception as exc:
            # Nothing was stopped yet: the loaded model keeps serving; the other one is
            # failed (quarantined) and the retry fetches it again.
            await self._publish_error(exc, retryable=True, context=f"switch to {spec.id}")
            self._retry_wanted.set()
            return
        self.switches += 1
        try:
            await self._switch(snapshot, spec, model_dir, self.settings.switch_grace_s)
        except Exception as exc:
            await self._apply_failed(snapshot, exc)

    async def _release_claim(self, model_id: str) -> None:
        """Release the switch claim once this node's pull on the model reached the server,
        so that no other node sees the model unclaimed and unpulled in between."""
        pipeline = self.pipeline
        if pipeline is not None and pipeline.serving.model_id == model_id:
            try:
                await asyncio.wait_for(pipeline.asked(), CLAIM_PULL_WAIT_S)
            except Exception as exc:
                log.debug("switch_claim_pull_wait_failed model=%s error=%r", model_id, exc)
        assert self._claims is not None
        await self._claims.release(model_id)

    async def _queues(self, models: list[ModelSpec]) -> dict[str, Queue]:
        """Each model's consumer: jobs pending, pull requests waiting."""
        assert self._nc is not None
        js = self._nc.jetstream()
        stream = self.settings.stream("JOBS")
        queues: dict[str, Queue] = {}
        for spec in models:
            try:
                info = await js.consumer_info(
                    stream, consumer_name(self.settings, spec.id), timeout=2
                )
            except Exception as exc:
                log.debug("consumer_info_failed model=%s error=%r", spec.id, exc)
                continue
            delivered = info.delivered.consumer_seq if info.delivered else 0
            queues[spec.id] = Queue(info.num_pending or 0, info.num_waiting or 0, delivered or 0)
        return queues

    async def _announce_loop(self) -> None:
        """One `model_state` lifecycle event per change of a model's state."""
        assert self._publisher is not None
        while True:
            entry = await self._model_changes.get()
            await self._publisher.try_lifecycle(
                LifecycleKind.MODEL_STATE,
                id=entry.id,
                version=entry.version,
                sha256=entry.sha256,
                state=entry.state.value,
                reason=entry.reason,
            )
            # Python 3.11's wait_for (under nats-py's request) can return a result and drop a
            # cancellation that raced it: the TaskGroup would then wait on this loop forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError

    async def _metrics_server(self, stop: asyncio.Event) -> None:
        port = self.settings.metrics_port
        assert port is not None
        try:
            async with MetricsServer(self.metrics, self.settings.metrics_host, port):
                await stop.wait()
        except OSError as exc:  # the port is taken: the node serves on, without metrics
            log.error("metrics_unavailable port=%d error=%s", port, exc)

    def _beat(self, at: float) -> None:
        self.last_heartbeat_at = at

    def _collect_metrics(self) -> None:
        stats = self._supervisor.stats() if self._supervisor is not None else None
        if stats is not None:
            self.metrics.runtime_restarts = stats.restarts
        self.metrics.engine = node_status.engine_gauges(self.model, stats)
        self.metrics.gpus = self.hardware.latest().gpus if self.hardware is not None else []

    def node_status(self) -> NodeStatus:
        """The state the heartbeat's `details` carry."""
        return NodeStatus.model_validate(self._status_fields())

    def status(self) -> StatusReply:
        """The answer of the status endpoint."""
        fields = self._status_fields()
        fields.update(
            node_id=self.key.node_id,
            network=self.settings.network,
            last_heartbeat_at=self.last_heartbeat_at,
        )
        return StatusReply.model_validate(fields)

    def _status_fields(self) -> dict[str, Any]:
        stats = self._supervisor.stats() if self._supervisor is not None else None
        facts = node_status.runtime_facts(self._supervisor)
        sup = asdict(stats) if stats is not None else {}
        pipeline = self.pipeline
        return {
            "config_hash": self.config_hash,
            "software": node_status.software(_version(), facts),
            "hardware": self.hardware.latest() if self.hardware is not None else None,
            "health": node_status.runtime_health(stats),
            "state": self.node_state.value,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config_version": self.snapshot.version if self.snapshot else None,
            "model": (
                {"id": self.model.id, "version": self.model.version, "sha256": self.model.sha256}
                if self.model
                else None
            ),
            "validation": self.validation_state.value,
            "models": [
                {
                    "id": m.id,
                    "version": m.version,
                    "sha256": m.sha256,
                    "state": m.state.value,
                    "reason": m.reason,
                }
                for m in self._life.models
            ],
            "runtime": _plain(sup),
            "pipeline": pipeline.state.value if pipeline else None,
            "in_flight": pipeline.in_flight if pipeline else 0,
            "completed": self.completed_before + (pipeline.completed if pipeline else 0),
            "admitted": self.admitted,
        }

    # NATS callbacks

    async def _on_reconnected(self) -> None:
        log.info("nats_reconnected url=%s", self._nc.connected_url if self._nc else None)
        if self.pipeline is not None:
            self.pipeline.reset_pulls()

    async def _on_disconnected(self) -> None:
        log.warning("nats_disconnected")

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats_error error=%r", exc)


async def _provision_at_start(js: Any, settings: Settings) -> None:
    """`ensure_streams`, retried while JetStream is briefly unavailable (a cluster electing
    stream leaders after a server restart answers with timeouts for a few seconds)."""

    for attempt in range(1, STARTUP_PROVISION_ATTEMPTS + 1):
        try:
            await ensure_streams(js, settings)
            return
        except (NatsTimeout, NoRespondersError, ServiceUnavailableError) as exc:
            if attempt == STARTUP_PROVISION_ATTEMPTS:
                raise
            log.warning("provision_retry try=%d error=%r", attempt, exc)
            await asyncio.sleep(min(5.0, 0.5 * attempt))


def handle_signals(agent: Agent, stop: asyncio.Event) -> None:
    """SIGTERM or SIGINT sets `stop` (drain, then exit); a second one sets `agent.force`
    (hand in-flight jobs back now instead of waiting out the grace period)."""

    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal signal=%d: handing jobs back now", signum)
            agent.force.set()
        else:
            log.info("signal_received signal=%d: draining", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def run_until_signalled(settings: Settings, key: NodeKey) -> None:
    """`resultity-node run`: serve until SIGTERM/SIGINT, then shut down (see `aclose`)."""
    stop = asyncio.Event()
    agent = Agent(settings, key)
    handle_signals(agent, stop)
    async with agent:
        tune_for_serving()
        await agent.serve(stop)


def _why_left_out(loadout: Loadout) -> str:
    return "; ".join(f"{spec.id}: {why}" for spec, why in loadout.left_out) or "none listed"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _version() -> str:

    try:
        return version("resultity-node")
    except PackageNotFoundError:
        return "0+unknown"
