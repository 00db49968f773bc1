"""`worker.runtime.request.transition`, table-tested without a process: every state × every
event, then the cases within one cell (which frame, which failure)."""

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from schemas import frames
from schemas.frames import FailCode
from worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    IsolationError,
    ItemFailed,
    NodeError,
    OutputMalformed,
    RuntimeBroken,
    RuntimeClosed,
    RuntimeEnded,
    RuntimeStartError,
    RuntimeTimeout,
)
from worker.runtime.api import Completion, Partial
from worker.runtime.request import (
    CANCEL,
    DISPATCH,
    FINAL,
    SEND_ABORT,
    SEND_SUBMIT,
    BreakRuntime,
    Emit,
    Event,
    Fail,
    FailOnceReplaced,
    GotDone,
    GotFailed,
    GotPartial,
    Overrun,
    Resolve,
    RuntimeLost,
    StartFailed,
    State,
    Step,
    transition,
)


@dataclass(frozen=True)
class View:
    """A request as the transition function reads it; frozen, so a transition that tried
    to change it would raise."""

    state: State
    job_id: str = "j"
    stream: bool = True
    max_tokens: int = 8
    streamed: int = 0
    solo: bool = False


def done_frame(tokens: int = 2, request_id: int = 1) -> dict[str, Any]:
    return dict(
        frames.done(
            request_id,
            token_ids=list(range(tokens)),
            text="x" * tokens,
            finish_reason="length",
            prompt_tokens=1,
            first_token_s=0.0,
        )
    )


def failed_frame(code: FailCode = FailCode.ENGINE) -> dict[str, Any]:
    return dict(frames.failed(1, code, "why"))


def partial_frame(tokens: int = 1) -> dict[str, Any]:
    return dict(frames.partial(1, list(range(tokens)), "t" * tokens))


EVENTS: dict[str, Event] = {
    "dispatch": DISPATCH,
    "partial": GotPartial(partial_frame()),
    "done": GotDone(done_frame()),
    "failed": GotFailed(failed_frame()),
    "cancel": CANCEL,
    "overrun": Overrun(30.0),
    "lost": RuntimeLost(RuntimeEnded("it died")),
    "closing": RuntimeLost(RuntimeClosed("closing"), closing=True),
    "start_failed": StartFailed(RuntimeStartError("no ready")),
}

ON_RUNTIME_ROW = {
    "dispatch": (None, []),
    "partial": (State.GENERATING, [Emit]),
    "done": (State.DONE, [Resolve]),
    "failed": (State.FAILED, [Fail]),
    "cancel": (State.ABORTED, [SEND_ABORT]),
    "overrun": (State.FAILED, [SEND_ABORT, Fail]),
    "lost": (State.HANDED_BACK, [FailOnceReplaced]),
    "closing": (State.HANDED_BACK, [FailOnceReplaced]),
    "start_failed": (None, []),
}
"""None: the state does not change."""

TABLE: dict[State, dict[str, tuple[State | None, list[Any]]]] = {
    State.WAITING: {
        "dispatch": (State.SENT, [SEND_SUBMIT]),
        "partial": (None, [BreakRuntime]),
        "done": (None, [BreakRuntime]),
        "failed": (None, [BreakRuntime]),
        "cancel": (State.ABORTED, []),
        "overrun": (State.FAILED, [Fail]),
        "lost": (None, []),
        "closing": (State.HANDED_BACK, [Fail]),
        "start_failed": (State.HANDED_BACK, [Fail]),
    },
    State.SENT: ON_RUNTIME_ROW,
    State.GENERATING: ON_RUNTIME_ROW,
    **{final: dict.fromkeys(EVENTS, (None, [])) for final in FINAL},
}


def shape(step: Step) -> tuple[State, list[Any]]:
    return (step.state, [a if a in (SEND_SUBMIT, SEND_ABORT) else type(a) for a in step.actions])


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TABLE) == set(State)
    assert all(set(row) == set(EVENTS) for row in TABLE.values())


@pytest.mark.parametrize("state", list(State), ids=str)
@pytest.mark.parametrize("event", list(EVENTS), ids=str)
def test_every_state_and_event(state: State, event: str) -> None:
    view = View(state)
    next_state, actions = TABLE[state][event]
    assert shape(transition(view, EVENTS[event])) == (next_state or state, actions)
    assert view == View(state)  # pure: the request is read, never changed


def outcome(step: Step) -> NodeError:
    (action,) = [a for a in step.actions if isinstance(a, Fail | FailOnceReplaced)]
    return action.error


def broken(step: Step) -> RuntimeBroken:
    (action,) = step.actions
    assert isinstance(action, BreakRuntime)
    return action.error


def test_partials_count_tokens_and_reach_the_sink() -> None:
    step = transition(View(State.GENERATING, streamed=3), GotPartial(partial_frame(2)))
    assert step.streamed == 5
    assert step.actions == (Emit(Partial([0, 1], "tt")),)


@pytest.mark.parametrize(
    ("view", "frame", "why"),
    [
        (View(State.SENT, stream=False), partial_frame(), "does not stream"),
        (View(State.GENERATING, streamed=7), partial_frame(2), "streamed 9 tokens"),
        (View(State.SENT), {"t": "partial", "id": 1, "token_ids": "no", "text": ""}, "bad"),
    ],
)
def test_a_partial_that_breaks_the_protocol_breaks_the_runtime(
    view: View, frame: dict[str, Any], why: str
) -> None:
    step = transition(view, GotPartial(frame))
    assert why in str(broken(step)) and step.state is view.state


def test_done_resolves_with_the_completion() -> None:
    step = transition(View(State.GENERATING, streamed=1), GotDone(done_frame(3)))
    (action,) = step.actions
    assert isinstance(action, Resolve) and isinstance(action.completion, Completion)
    assert action.completion.token_ids == [0, 1, 2] and action.completion.job_id == "j"


@pytest.mark.parametrize(
    ("view", "frame", "why"),
    [
        (View(State.SENT, max_tokens=2), done_frame(3), "max_tokens is 2"),
        (View(State.GENERATING, streamed=3), done_frame(2), "3 tokens streamed"),
        (View(State.SENT), {**done_frame(), "finish_reason": "bored"}, "finish_reason"),
    ],
)
def test_a_bad_final_frame_is_the_jobs_error_not_the_runtimes(
    view: View, frame: dict[str, Any], why: str
) -> None:
    step = transition(view, GotDone(frame))
    error = outcome(step)
    assert step.state is State.FAILED and isinstance(error, OutputMalformed) and why in str(error)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (FailCode.BAD_REQUEST, BadRequest),
        (FailCode.DEADLINE, DeadlineExceeded),
        (FailCode.ENGINE, ItemFailed),
    ],
)
def test_failed_frames_fail_the_job_alone(code: FailCode, error: type[NodeError]) -> None:
    step = transition(View(State.SENT), GotFailed(failed_frame(code)))
    assert step.state is State.FAILED and type(outcome(step)) is error
    assert not outcome(step).retryable


def test_an_abort_the_agent_never_asked_for_breaks_the_runtime() -> None:
    step = transition(View(State.GENERATING), GotFailed(failed_frame(FailCode.ABORTED)))
    assert "on its own" in str(broken(step))
    assert "bad 'failed'" in str(broken(transition(View(State.SENT), GotFailed({"t": "failed"}))))


def test_a_request_past_its_run_time_is_aborted_alone_as_deadline_exceeded() -> None:
    step = transition(View(State.GENERATING), Overrun(2.5))
    error = outcome(step)
    assert step.actions[0] is SEND_ABORT and not any(
        isinstance(a, BreakRuntime) for a in step.actions
    )
    assert isinstance(error, DeadlineExceeded) and not error.retryable
    assert "request_timeout_s=2.5s" in str(error)


@pytest.mark.parametrize("state", [State.SENT, State.GENERATING])
def test_a_lost_runtime_hands_the_request_back_once_replaced(state: State) -> None:
    (action,) = transition(View(state), RuntimeLost(RuntimeTimeout("no pong"))).actions
    assert isinstance(action, FailOnceReplaced) and action.strike
    assert type(action.error) is RuntimeTimeout and action.error.retryable
    assert "job j" in str(action.error) and "no pong" in str(action.error)


def test_a_closed_runtime_hands_back_without_a_strike() -> None:
    for event in (RuntimeLost(RuntimeClosed("replaced")), EVENTS["closing"]):
        (action,) = transition(View(State.SENT), event).actions
        assert isinstance(action, FailOnceReplaced) and not action.strike
        assert isinstance(action.error, RuntimeClosed) and action.error.retryable


def test_a_solo_request_on_a_lost_runtime_fails_alone_and_final() -> None:
    step = transition(View(State.GENERATING, solo=True), RuntimeLost(RuntimeEnded("died")))
    (action,) = step.actions
    assert step.state is State.FAILED and isinstance(action, FailOnceReplaced)
    assert not action.strike and isinstance(action.error, ItemFailed)
    assert not action.error.retryable and "the last time alone" in str(action.error)


def test_a_runtime_that_cannot_start_for_the_node_hands_its_waiting_jobs_back() -> None:
    """`IsolationError` is final for the node, not for the job: a retryable error."""
    step = transition(View(State.WAITING), StartFailed(IsolationError("privileged")))
    error = outcome(step)
    assert step.state is State.HANDED_BACK
    assert isinstance(error, RuntimeStartError) and error.retryable and "privileged" in str(error)


def test_views_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        View(State.SENT).state = State.DONE  # type: ignore[misc]
