"""The node's lifecycle record and its pure transition function, table-tested: every state
times every event, without a server."""

from dataclasses import replace

import pytest

from schemas.node import NodeState, ValidationState
from schemas.snapshot import ModelSpec, Snapshot
from tests.support.payloads import snapshot as snapshot_body
from worker.node.lifecycle import (
    AwaitingConfig,
    Closed,
    Event,
    InForce,
    Lifecycle,
    Loaded,
    OutOfService,
    Serving,
    Starting,
    Stopping,
    Switching,
    TransitionError,
    Validated,
    ValidationNotRun,
    step,
)

S = NodeState
V1 = Snapshot.model_validate(snapshot_body())
MODEL = V1.models[0]
V2_SAME = Snapshot.model_validate(snapshot_body() | {"version": 2})
V3_REVOKED = Snapshot.model_validate(
    snapshot_body() | {"version": 3, "models": [snapshot_body()["models"][1]]}
)


def at(state: NodeState) -> Lifecycle:
    """A plausible record in `state`: a model loaded and validated where one can be."""
    loaded = state in (S.APPLYING, S.SERVING)
    return Lifecycle(
        state=state,
        snapshot=V1 if state not in (S.NEW, S.STARTING, S.WAITING_CONFIG) else None,
        model=MODEL if loaded else None,
        validation=ValidationState.PASSED if loaded else ValidationState.NONE,
    )


EVENTS: dict[str, Event] = {
    "starting": Starting(),
    "awaiting": AwaitingConfig(),
    "in_force": InForce(V2_SAME),
    "revoking": InForce(V3_REVOKED),
    "switching": Switching(),
    "loaded": Loaded(MODEL),
    "validated": Validated(),
    "not_run": ValidationNotRun(),
    "serving": Serving(),
    "out": OutOfService("why"),
    "invalid": OutOfService("vectors", invalid=True),
    "stopping": Stopping(),
    "closed": Closed(),
}
X = TransitionError

# state after each event, per state; X: the event does not apply there.
TABLE: dict[NodeState, dict[str, NodeState | type[TransitionError]]] = {
    S.NEW: {
        "starting": S.STARTING, "awaiting": X, "in_force": X, "revoking": X,
        "switching": X, "loaded": X, "validated": X, "not_run": X, "serving": X,
        "out": X, "invalid": X, "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.STARTING: {
        "starting": X, "awaiting": S.WAITING_CONFIG, "in_force": S.STARTING,
        "revoking": S.STARTING, "switching": X, "loaded": X, "validated": X, "not_run": X,
        "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.WAITING_CONFIG: {
        "starting": X, "awaiting": X, "in_force": S.WAITING_CONFIG,
        "revoking": S.WAITING_CONFIG, "switching": S.APPLYING, "loaded": X, "validated": X,
        "not_run": X, "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.APPLYING: {
        "starting": X, "awaiting": X, "in_force": S.APPLYING, "revoking": S.OUT_OF_SERVICE,
        "switching": S.APPLYING, "loaded": S.APPLYING, "validated": S.APPLYING,
        "not_run": S.APPLYING, "serving": S.SERVING, "out": S.OUT_OF_SERVICE,
        "invalid": S.OUT_OF_SERVICE, "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.SERVING: {
        "starting": X, "awaiting": X, "in_force": S.SERVING, "revoking": S.OUT_OF_SERVICE,
        "switching": S.APPLYING, "loaded": X, "validated": S.SERVING, "not_run": S.SERVING,
        "serving": S.SERVING, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.OUT_OF_SERVICE: {
        "starting": X, "awaiting": X, "in_force": S.OUT_OF_SERVICE,
        "revoking": S.OUT_OF_SERVICE, "switching": S.APPLYING, "loaded": X, "validated": X,
        "not_run": X, "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.STOPPING: {
        "starting": X, "awaiting": X, "in_force": X, "revoking": X, "switching": X,
        "loaded": X, "validated": X, "not_run": X, "serving": X, "out": X, "invalid": X,
        "stopping": S.STOPPING, "closed": S.CLOSED,
    },
    S.CLOSED: dict.fromkeys(EVENTS, X),
}  # fmt: skip


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TABLE) == set(NodeState)
    assert all(set(row) == set(EVENTS) for row in TABLE.values())


@pytest.mark.parametrize(
    ("state", "event"), [(s, e) for s in TABLE for e in EVENTS], ids=lambda v: str(v)
)
def test_every_state_and_event(state: NodeState, event: str) -> None:
    expected = TABLE[state][event]
    before = at(state)
    if expected is TransitionError:
        with pytest.raises(TransitionError):
            step(before, EVENTS[event])
        return
    after = step(before, EVENTS[event])
    assert after.state is expected
    assert before == at(state), "step changed its input"
    if after.state in (S.OUT_OF_SERVICE, S.CLOSED, S.WAITING_CONFIG, S.STARTING, S.NEW):
        assert after.model is None, "a node that serves nothing names no model"
    if after.state is S.SERVING:  # passed; or a periodic rerun could not run just now
        assert after.model is not None
        assert after.validation in (ValidationState.PASSED, ValidationState.NOT_RUN)


def test_a_revoked_model_leaves_with_the_snapshot_that_revokes_it() -> None:
    after = step(at(S.SERVING), InForce(V3_REVOKED))
    assert after.snapshot is V3_REVOKED and after.model is None
    assert after.validation is ValidationState.NONE
    assert after.reason is not None and "no longer approves" in after.reason


def test_a_snapshot_that_keeps_the_model_keeps_serving_it() -> None:
    after = step(at(S.SERVING), InForce(V2_SAME))
    assert after == replace(at(S.SERVING), snapshot=V2_SAME)


def test_a_model_of_the_same_id_with_other_bytes_is_revoked() -> None:
    other: ModelSpec = MODEL.model_copy(update={"sha256": "f" * 64})
    body = snapshot_body() | {"version": 2, "models": [other.model_dump(mode="json")]}
    after = step(at(S.SERVING), InForce(Snapshot.model_validate(body)))
    assert after.state is S.OUT_OF_SERVICE and after.model is None


def test_serving_needs_passed_vectors() -> None:
    loaded = step(step(at(S.OUT_OF_SERVICE), Switching()), Loaded(MODEL))
    assert loaded.validation is ValidationState.RUNNING
    with pytest.raises(TransitionError, match="validation running"):
        step(loaded, Serving())
    assert step(step(loaded, Validated()), Serving()).state is S.SERVING


def test_failed_vectors_take_the_model_out_with_the_reason() -> None:
    after = step(at(S.SERVING), OutOfService("vector 0 failed", invalid=True))
    assert after.validation is ValidationState.FAILED and after.model is None
    assert after.reason == "vector 0 failed"


def test_the_model_in_service_takes_the_new_snapshots_spec_of_it() -> None:
    """Same bytes, new vectors: the record holds the new spec (the agent reruns them)."""
    body = snapshot_body() | {"version": 2}
    body["models"][0]["validation"] = []
    after = step(at(S.SERVING), InForce(Snapshot.model_validate(body)))
    assert after.state is S.SERVING and after.model is not None
    assert after.model.validation == [] != MODEL.validation
