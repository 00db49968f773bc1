"""`states.transition`, the job's state machine, without a server: every phase x event, on
a first delivery and on the last one."""

import itertools
from dataclasses import dataclass

import pytest

from worker.core.errors import BadRequest, Cancelled, NodeError, OutputMalformed, RuntimeEnded
from worker.jobs.states import (
    NAK_MAX_DELAY_S,
    Aborted,
    Answer,
    Do,
    Event,
    Failed,
    HandBack,
    Malformed,
    Phase,
    Reported,
    ReportFailed,
    Start,
    Stop,
    Stored,
    StoreFailed,
    nak_delay,
    transition,
)

MAX_DELIVER = 3
CANCELLED = Cancelled("job j was cancelled")
CRASHED = RuntimeEnded("runtime exited with code 137")
REFUSED = BadRequest("bad params")
MALFORMED = OutputMalformed("token id 2^31")

EVENTS: dict[str, Event] = {
    "start": Start(),
    "stop": Stop(CANCELLED),
    "answer": Answer(),
    "failed_retryable": Failed(CRASHED),
    "failed_final": Failed(REFUSED),
    "aborted": Aborted(),
    "malformed": Malformed(MALFORMED),
    "stored": Stored(),
    "store_failed_1": StoreFailed(TimeoutError(), 1),
    "store_failed_3": StoreFailed(TimeoutError(), 3),
    "reported_final": Reported(final=True),
    "reported_retryable": Reported(final=False),
    "report_failed": ReportFailed(),
    "hand_back": HandBack(),
}


@dataclass
class FakeJob:
    phase: Phase
    attempt: int
    reason: NodeError | None = None


A, S, X, W, R = Phase.ADMITTED, Phase.SUBMITTED, Phase.ABORTING, Phase.ANSWERED, Phase.REPORTING
ACKED, NAKED, TERMED = Phase.ACKED, Phase.NAKED, Phase.TERMED
same = None  # the phase does not change, nothing is done

# (phase, event) -> (new phase, decision, reported error, final) on a first delivery; every
# pair not listed for an unsettled phase is `same`, and a settled phase ignores everything.
MOVES: dict[tuple[Phase, str], tuple[Phase, Do, NodeError | None, bool] | None] = {
    (A, "start"): (S, Do.SUBMIT, None, False),
    (A, "stop"): (R, Do.REPORT, CANCELLED, True),
    (A, "hand_back"): (NAKED, Do.NAK, None, False),
    (S, "stop"): (X, Do.ABORT, CANCELLED, False),
    (S, "answer"): (W, Do.PUBLISH, None, False),
    (S, "failed_retryable"): (R, Do.REPORT, CRASHED, False),
    (S, "failed_final"): (R, Do.REPORT, REFUSED, True),
    (S, "aborted"): (R, Do.REPORT, None, False),  # a RuntimeFailure of its own
    (S, "hand_back"): (NAKED, Do.NAK, None, False),
    (X, "answer"): (R, Do.REPORT, CANCELLED, True),
    (X, "failed_retryable"): (R, Do.REPORT, CANCELLED, True),
    (X, "failed_final"): (R, Do.REPORT, CANCELLED, True),
    (X, "aborted"): (R, Do.REPORT, CANCELLED, True),
    (X, "hand_back"): (NAKED, Do.NAK, None, False),
    (W, "stored"): (ACKED, Do.ACK, None, False),
    (W, "malformed"): (R, Do.REPORT, MALFORMED, True),
    (W, "store_failed_1"): (W, Do.REPUBLISH, None, False),
    (W, "store_failed_3"): (NAKED, Do.NAK, None, False),
    (W, "hand_back"): (NAKED, Do.NAK, None, False),
    (R, "reported_final"): (TERMED, Do.TERM, None, False),
    (R, "reported_retryable"): (NAKED, Do.NAK, None, False),
    (R, "report_failed"): (NAKED, Do.NAK, None, False),
    (R, "hand_back"): (NAKED, Do.NAK, None, False),
}

# What changes on the last delivery: a retryable failure is reported as final, a result
# that cannot be published is reported (final), an unreported job is terminated.
LAST_DELIVERY: dict[tuple[Phase, str], tuple[Phase, Do, NodeError | None, bool] | None] = {
    (S, "failed_retryable"): (R, Do.REPORT, CRASHED, True),
    (S, "aborted"): (R, Do.REPORT, None, True),
    (W, "store_failed_3"): (R, Do.REPORT, None, True),
    (R, "report_failed"): (TERMED, Do.TERM, None, False),
}

CASES = [
    pytest.param(phase, name, attempt, id=f"{phase.value}-{name}-{attempt}")
    for phase, name, attempt in itertools.product(Phase, EVENTS, (1, MAX_DELIVER))
]


@pytest.mark.parametrize(("phase", "name", "attempt"), CASES)
def test_every_phase_and_event(phase: Phase, name: str, attempt: int) -> None:
    job = FakeJob(phase, attempt, reason=CANCELLED if phase is X else None)
    step = transition(job, EVENTS[name], MAX_DELIVER)
    table = MOVES if attempt == 1 else MOVES | LAST_DELIVERY
    want = None if phase.settled else table.get((phase, name))
    if want is None:
        assert (step.phase, step.do) == (phase, Do.NOTHING)
        return
    new_phase, do, error, final = want
    assert (step.phase, step.do, step.final) == (new_phase, do, final)
    if error is not None:
        assert step.error is error
    if do is Do.REPORT:
        # "last delivery" is said of an error that would have been retried, and only then
        first = MOVES.get((phase, name))
        made_final = attempt == MAX_DELIVER and (first is None or not first[3])
        assert step.error is not None and step.last_delivery == made_final


def test_the_table_names_real_pairs_only() -> None:
    assert set(MOVES) | set(LAST_DELIVERY) <= set(itertools.product(Phase, EVENTS))
    assert not any(phase.settled for phase, _ in MOVES)


def test_a_retryable_failure_naks_with_a_growing_delay() -> None:
    delays = [
        transition(FakeJob(R, attempt), Reported(final=False), 99).delay for attempt in (1, 2, 3)
    ]
    assert delays == [nak_delay(1), nak_delay(2), nak_delay(3)] == [1.0, 2.0, 4.0]
    assert nak_delay(30) == NAK_MAX_DELAY_S


def test_hand_backs_and_failed_reports_nak_at_once() -> None:
    for phase in (A, S, X, W, R):
        assert transition(FakeJob(phase, 1), HandBack(), MAX_DELIVER).delay is None
    assert transition(FakeJob(R, 1), ReportFailed(), MAX_DELIVER).delay is None


def test_a_failed_publish_is_retried_with_a_pause_that_grows() -> None:
    steps = [
        transition(FakeJob(W, 1), StoreFailed(TimeoutError(), tries), MAX_DELIVER)
        for tries in (1, 2)
    ]
    assert [(s.do, s.delay) for s in steps] == [(Do.REPUBLISH, 0.2), (Do.REPUBLISH, 0.4)]
