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
"""

from dataclasses import dataclass, replace
from typing import TypeAlias

from schemas.node import NodeState, ValidationState
from schemas.snapshot import ModelSpec, Snapshot


class TransitionError(ValueError):
    """An event that makes no sense in the current state (a bug in the agent)."""


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
            if life.model is None:
                return replace(life, snapshot=snapshot)
            listed = _listed(snapshot, life.model)
            if listed is None:
                # Revoked: it stops at once, whatever the apply of the rest does.
                return _out(
                    replace(life, snapshot=snapshot),
                    f"snapshot {snapshot.version} no longer approves model "
                    f"{life.model.id} {life.model.version}",
                )
            # The same bytes stay in service, under the new snapshot's spec of them (its
            # vectors, if they changed, are the agent's to run).
            return replace(life, snapshot=snapshot, model=listed)
        case Switching():
            _expect(state, event, OPEN - {NodeState.STARTING})
            return replace(
                life,
                state=NodeState.APPLYING,
                model=None,
                validation=ValidationState.NONE,
                reason=None,
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
            return replace(life, state=NodeState.SERVING, reason=None)
        case OutOfService(reason, invalid):
            _expect(state, event, OPEN)
            out = _out(life, reason)
            return replace(out, validation=ValidationState.FAILED) if invalid else out
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
    )


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
