"""The node's lifecycle as one record, changed only by `step`, a pure function of an event.

The node state, the snapshot in force, the model in service and where its validation
stands used to be separate fields of the agent changed at different awaits, so a reader in
between saw a mix (a node out of service that still named a revoked model). Now the agent
holds one frozen `Lifecycle` and replaces it whole, in one step with no await, with what
`step` returns; the I/O (stopping a pipeline, a runtime) comes after, and a reader sees the
state before or after, never half of it.

    NEW -> STARTING -> WAITING_CONFIG --InForce--> (unchanged; the apply decides)
    Switching: APPLYING (no model)  --Loaded--> APPLYING (model, validation running)
      --Validated--> --Serving--> SERVING
    OutOfService (any open state): OUT_OF_SERVICE, no model
    InForce of a snapshot that no longer lists the model in service: OUT_OF_SERVICE at once
    Stopping -> STOPPING, Closed -> CLOSED (final: nothing moves a closed node)

Every model the snapshot in force approves has a state in the same record (`models`):
pending until verified in the cache, then ready; active while served; failed (with the
reason) when its bytes, archive or vectors fail; removed once a snapshot drops it (kept
in the list until the next snapshot, so that the removal is seen).
"""

from dataclasses import dataclass, replace
from typing import TypeAlias

from schemas.node import ModelState, NodeState, ValidationState
from schemas.snapshot import ModelSpec, Snapshot


class TransitionError(ValueError):
    """An event that makes no sense in the current state (a bug in the agent)."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    version: str
    sha256: str
    state: ModelState
    reason: str | None = None

    def same(self, spec: ModelSpec) -> bool:
        return (self.id, self.version, self.sha256) == (spec.id, spec.version, spec.sha256)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    state: NodeState = NodeState.NEW
    snapshot: Snapshot | None = None
    """The snapshot in force (verified), whether or not its apply succeeded."""
    model: ModelSpec | None = None
    """The model the runtime has loaded for service; None whenever nothing is served."""
    validation: ValidationState = ValidationState.NONE
    reason: str | None = None
    """Why the node is out of service."""
    models: tuple[ModelEntry, ...] = ()
    """Every model of the snapshot in force (and those it just removed), with its state."""

    def model_state(self, spec: ModelSpec) -> ModelEntry | None:
        return next((m for m in self.models if m.same(spec)), None)


@dataclass(frozen=True, slots=True)
class Starting:
    pass


@dataclass(frozen=True, slots=True)
class AwaitingConfig:
    pass


@dataclass(frozen=True, slots=True)
class InForce:
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Switching:
    """What runs must change: the old runtime goes (or is replaced)."""


@dataclass(frozen=True, slots=True)
class Loaded:
    model: ModelSpec


@dataclass(frozen=True, slots=True)
class Validated:
    """The model's vectors passed."""


@dataclass(frozen=True, slots=True)
class ValidationNotRun:
    pass


@dataclass(frozen=True, slots=True)
class Serving:
    pass


@dataclass(frozen=True, slots=True)
class OutOfService:
    reason: str
    invalid: bool = False
    """The model's validation vectors failed (MODEL_INVALID)."""


@dataclass(frozen=True, slots=True)
class ModelVerified:
    """The model's bytes are in the cache and verified."""

    model: ModelSpec


@dataclass(frozen=True, slots=True)
class ModelFailed:
    model: ModelSpec
    reason: str


@dataclass(frozen=True, slots=True)
class Stopping:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    pass


Event: TypeAlias = (
    Starting
    | AwaitingConfig
    | InForce
    | Switching
    | Loaded
    | Validated
    | ValidationNotRun
    | Serving
    | OutOfService
    | ModelVerified
    | ModelFailed
    | Stopping
    | Closed
)

OPEN = frozenset(
    {
        NodeState.STARTING,
        NodeState.WAITING_CONFIG,
        NodeState.APPLYING,
        NodeState.SERVING,
        NodeState.OUT_OF_SERVICE,
    }
)
"""States in which the node follows snapshots (neither new nor shutting down)."""


def step(life: Lifecycle, event: Event) -> Lifecycle:
    """The lifecycle after `event`. Pure; raises `TransitionError` for an event that does
    not apply in `life.state`."""
    state = life.state
    if state is NodeState.CLOSED:
        raise TransitionError(f"{type(event).__name__} after the node closed")
    match event:
        case Starting():
            _expect(state, event, {NodeState.NEW})
            return replace(life, state=NodeState.STARTING)
        case AwaitingConfig():
            _expect(state, event, {NodeState.STARTING})
            return replace(life, state=NodeState.WAITING_CONFIG)
        case InForce(snapshot):
            _expect(state, event, OPEN)
            life = replace(life, snapshot=snapshot, models=_loadout(life.models, snapshot))
            if life.model is None:
                return life
            listed = _listed(snapshot, life.model)
            if listed is None:
                # Revoked: it stops at once, whatever the apply of the rest does.
                return _out(
                    life,
                    f"snapshot {snapshot.version} no longer approves model "
                    f"{life.model.id} {life.model.version}",
                )
            # The same bytes stay in service, under the new snapshot's spec of them (its
            # vectors, if they changed, are the agent's to run).
            return replace(life, model=listed)
        case Switching():
            _expect(state, event, OPEN - {NodeState.STARTING})
            return replace(
                life,
                state=NodeState.APPLYING,
                model=None,
                validation=ValidationState.NONE,
                reason=None,
                models=_inactive(life.models),
            )
        case Loaded(model):
            _expect(state, event, {NodeState.APPLYING})
            return replace(life, model=model, validation=ValidationState.RUNNING)
        case Validated():
            _expect(state, event, {NodeState.APPLYING, NodeState.SERVING})
            _need_model(life, event)
            return replace(life, validation=ValidationState.PASSED)
        case ValidationNotRun():
            _expect(state, event, {NodeState.APPLYING, NodeState.SERVING})
            return replace(life, validation=ValidationState.NOT_RUN)
        case Serving():
            _expect(state, event, {NodeState.APPLYING, NodeState.SERVING})
            _need_model(life, event)
            if life.validation is not ValidationState.PASSED:
                raise TransitionError(f"serving with validation {life.validation.value}")
            served = life.model
            assert served is not None
            models = _set(_inactive(life.models), served, ModelState.ACTIVE)
            return replace(life, state=NodeState.SERVING, reason=None, models=models)
        case OutOfService(reason, invalid):
            _expect(state, event, OPEN)
            out = _out(life, reason)
            if invalid and life.model is not None:
                models = _set(out.models, life.model, ModelState.FAILED, reason)
                return replace(out, validation=ValidationState.FAILED, models=models)
            return out
        case ModelVerified(model):
            _expect(state, event, OPEN)
            entry = life.model_state(model)
            if entry is None or entry.state in (ModelState.ACTIVE, ModelState.READY):
                return life
            return replace(life, models=_set(life.models, model, ModelState.READY))
        case ModelFailed(model, reason):
            _expect(state, event, OPEN)
            if life.model_state(model) is None:
                return life
            return replace(life, models=_set(life.models, model, ModelState.FAILED, reason))
        case Stopping():
            return replace(life, state=NodeState.STOPPING)
        case Closed():
            return replace(life, state=NodeState.CLOSED, model=None)
    raise TransitionError(f"unknown event {event!r}")


def _out(life: Lifecycle, reason: str) -> Lifecycle:
    return replace(
        life,
        state=NodeState.OUT_OF_SERVICE,
        model=None,
        validation=ValidationState.NONE,
        reason=reason,
        models=_inactive(life.models),
    )


def _loadout(models: tuple[ModelEntry, ...], snapshot: Snapshot) -> tuple[ModelEntry, ...]:
    """The models of `snapshot`, each keeping the state it had (a new one is pending), then
    the ones it no longer lists, removed (those removed before are forgotten)."""
    approved = []
    for spec in snapshot.models:
        entry = next((m for m in models if m.same(spec)), None)
        if entry is None or entry.state is ModelState.REMOVED:
            entry = ModelEntry(spec.id, spec.version, spec.sha256, ModelState.PENDING)
        approved.append(entry)
    gone = [
        replace(m, state=ModelState.REMOVED, reason=f"not approved by snapshot {snapshot.version}")
        for m in models
        if m.state is not ModelState.REMOVED and not any(m.same(s) for s in snapshot.models)
    ]
    return (*approved, *gone)


def _inactive(models: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
    return tuple(
        replace(m, state=ModelState.READY) if m.state is ModelState.ACTIVE else m for m in models
    )


def _set(
    models: tuple[ModelEntry, ...], spec: ModelSpec, state: ModelState, reason: str | None = None
) -> tuple[ModelEntry, ...]:
    return tuple(replace(m, state=state, reason=reason) if m.same(spec) else m for m in models)


def _listed(snapshot: Snapshot, model: ModelSpec) -> ModelSpec | None:
    """The snapshot's spec of `model` (same id, version and bytes), if it still lists it."""
    for spec in snapshot.models:
        if (spec.id, spec.version, spec.sha256) == (model.id, model.version, model.sha256):
            return spec
    return None


def _expect(state: NodeState, event: Event, allowed: set[NodeState] | frozenset[NodeState]) -> None:
    if state not in allowed:
        raise TransitionError(f"{type(event).__name__} in state {state.value}")


def _need_model(life: Lifecycle, event: Event) -> None:
    if life.model is None:
        raise TransitionError(f"{type(event).__name__} with no model loaded")
