"""The node's lifecycle record and its pure transition function, table-tested: every state
times every event, without a server."""

from dataclasses import replace

import pytest

from schemas.node import ModelState, NodeState, ValidationState
from schemas.snapshot import ModelSpec, Snapshot
from tests.support.payloads import snapshot as snapshot_body
from worker.node.lifecycle import (
    AwaitingConfig,
    Closed,
    Event,
    InForce,
    Lifecycle,
    Loaded,
    ModelFailed,
    ModelVerified,
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
    "verified": ModelVerified(MODEL),
    "bad_bytes": ModelFailed(MODEL, "SHA-256 mismatch"),
    "stopping": Stopping(),
    "closed": Closed(),
}
X = TransitionError

# state after each event, per state; X: the event does not apply there.
TABLE: dict[NodeState, dict[str, NodeState | type[TransitionError]]] = {
    S.NEW: {
        "starting": S.STARTING, "awaiting": X, "in_force": X, "revoking": X,
        "switching": X, "loaded": X, "validated": X, "not_run": X, "serving": X,
        "out": X, "invalid": X, "stopping": S.STOPPING, "verified": X, "bad_bytes": X,
        "closed": S.CLOSED,
    },
    S.STARTING: {
        "starting": X, "awaiting": S.WAITING_CONFIG, "in_force": S.STARTING,
        "revoking": S.STARTING, "switching": X, "loaded": X, "validated": X, "not_run": X,
        "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "verified": S.STARTING, "bad_bytes": S.STARTING,
        "closed": S.CLOSED,
    },
    S.WAITING_CONFIG: {
        "starting": X, "awaiting": X, "in_force": S.WAITING_CONFIG,
        "revoking": S.WAITING_CONFIG, "switching": S.APPLYING, "loaded": X, "validated": X,
        "not_run": X, "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "verified": S.WAITING_CONFIG, "bad_bytes": S.WAITING_CONFIG,
        "closed": S.CLOSED,
    },
    S.APPLYING: {
        "starting": X, "awaiting": X, "in_force": S.APPLYING, "revoking": S.OUT_OF_SERVICE,
        "switching": S.APPLYING, "loaded": S.APPLYING, "validated": S.APPLYING,
        "not_run": S.APPLYING, "serving": S.SERVING, "out": S.OUT_OF_SERVICE,
        "invalid": S.OUT_OF_SERVICE, "stopping": S.STOPPING, "verified": S.APPLYING,
        "bad_bytes": S.APPLYING,
        "closed": S.CLOSED,
    },
    S.SERVING: {
        "starting": X, "awaiting": X, "in_force": S.SERVING, "revoking": S.OUT_OF_SERVICE,
        "switching": S.APPLYING, "loaded": X, "validated": S.SERVING, "not_run": S.SERVING,
        "serving": S.SERVING, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "verified": S.SERVING, "bad_bytes": S.SERVING,
        "closed": S.CLOSED,
    },
    S.OUT_OF_SERVICE: {
        "starting": X, "awaiting": X, "in_force": S.OUT_OF_SERVICE,
        "revoking": S.OUT_OF_SERVICE, "switching": S.APPLYING, "loaded": X, "validated": X,
        "not_run": X, "serving": X, "out": S.OUT_OF_SERVICE, "invalid": S.OUT_OF_SERVICE,
        "stopping": S.STOPPING, "verified": S.OUT_OF_SERVICE, "bad_bytes": S.OUT_OF_SERVICE,
        "closed": S.CLOSED,
    },
    S.STOPPING: {
        "starting": X, "awaiting": X, "in_force": X, "revoking": X, "switching": X,
        "loaded": X, "validated": X, "not_run": X, "serving": X, "out": X, "invalid": X,
        "stopping": S.STOPPING, "verified": X, "bad_bytes": X,
        "closed": S.CLOSED,
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
    assert replace(after, models=()) == replace(at(S.SERVING), snapshot=V2_SAME)


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


def states(life: Lifecycle) -> dict[str, ModelState]:
    return {m.id: m.state for m in life.models}


def test_every_approved_model_has_one_state_from_pending_to_active() -> None:
    life = step(at(S.WAITING_CONFIG), InForce(V1))
    assert states(life) == {"tiny": ModelState.PENDING, "other": ModelState.PENDING}
    life = step(life, ModelVerified(MODEL))
    assert states(life)["tiny"] is ModelState.READY
    for event in (Switching(), Loaded(MODEL), Validated(), Serving()):
        life = step(life, event)
    assert states(life) == {"tiny": ModelState.ACTIVE, "other": ModelState.PENDING}
    life = step(life, Switching())
    assert states(life)["tiny"] is ModelState.READY, "inactive while another loads"


def test_a_model_that_fails_is_failed_with_its_reason_until_it_verifies() -> None:
    life = step(step(at(S.WAITING_CONFIG), InForce(V1)), ModelFailed(MODEL, "SHA-256 mismatch"))
    entry = life.model_state(MODEL)
    assert entry is not None and entry.state is ModelState.FAILED
    assert entry.reason == "SHA-256 mismatch"
    life = step(life, InForce(V2_SAME))
    assert states(life)["tiny"] is ModelState.FAILED, "a resync does not forget a failure"
    assert states(step(life, ModelVerified(MODEL)))["tiny"] is ModelState.READY


def test_failed_vectors_fail_the_model_in_service() -> None:
    life = replace(step(at(S.WAITING_CONFIG), InForce(V1)), state=S.SERVING, model=MODEL)
    life = step(life, OutOfService("vector 0", invalid=True))
    assert states(life)["tiny"] is ModelState.FAILED and life.models[0].reason == "vector 0"


def test_a_model_dropped_by_a_snapshot_is_removed_then_forgotten() -> None:
    life = step(step(at(S.WAITING_CONFIG), InForce(V1)), InForce(V3_REVOKED))
    assert states(life) == {"other": ModelState.PENDING, "tiny": ModelState.REMOVED}
    body = snapshot_body() | {"version": 4, "models": [snapshot_body()["models"][1]]}
    life = step(life, InForce(Snapshot.model_validate(body)))
    assert states(life) == {"other": ModelState.PENDING}
