"""One delivered job's phases, and the one pure function that moves a job between them.

    ADMITTED --Start--> SUBMITTED --Answer--> ANSWERED --Stored--> ACKED
       |                 |       |                 |
       | Stop            | Stop  | Failed,         | Malformed; StoreFailed on the last
       |                 v       | Aborted         | delivery (before it: publish again,
       |             ABORTING    |                 | then NAKED)
       |                 | any answer              |
       v                 v       v                 v
    REPORTING <--------------------------------------
       |--Reported (final)----> TERMED
       |--Reported------------> NAKED, with a delay that grows per delivery
       '--ReportFailed--------> TERMED on the last delivery, else NAKED

    HandBack (drain, close, a bug) takes any unsettled job to NAKED, without an error event.

`transition` does no I/O: it reads a job's phase, delivery count and stop reason, and says
what the pipeline must do (`Do`); the pipeline's shells (intake callback, runtime future
callback, results task, PubAck callback, settle task) feed it events and carry the
decisions out. A job's record leaves the pipeline when it reaches a settled phase; the
ack, nak or term itself is sent by the one settle task.
"""

import enum
from dataclasses import dataclass
from typing import Protocol

from worker.core.errors import NodeError, RuntimeFailure

NAK_BASE_DELAY_S = 1.0
NAK_MAX_DELAY_S = 60.0
PUBLISH_ATTEMPTS = 3


class Phase(enum.Enum):
    ADMITTED = "admitted"
    """Decoded and checked; waiting for a runtime slot."""
    SUBMITTED = "submitted"
    """Its request is with the runtime."""
    ABORTING = "aborting"
    """Cancelled or past its deadline while running: the abort is sent, the runtime's
    answer awaited (the stop reason is its outcome, whatever the answer)."""
    ANSWERED = "answered"
    """The runtime completed it: its result is signed and published, the stream's PubAck
    awaited."""
    REPORTING = "reporting"
    """Its error event is being published; a term or a nak follows."""
    ACKED = "acked"
    """Settled: its result is stored."""
    NAKED = "naked"
    """Settled: handed back to the stream, to run again."""
    TERMED = "termed"
    """Settled: ended for good (its final error event is stored, or could not be)."""

    @property
    def settled(self) -> bool:
        return self in (Phase.ACKED, Phase.NAKED, Phase.TERMED)


class Do(enum.Enum):
    """What the pipeline does after a transition."""

    NOTHING = "nothing"
    SUBMIT = "submit"
    """Send its request to the runtime."""
    ABORT = "abort"
    """Abort its request; the runtime's answer comes back as an event."""
    PUBLISH = "publish"
    """Hand its completion to the results task: sign, publish, wait for the PubAck."""
    REPUBLISH = "republish"
    """Publish its result again after `delay` seconds (a publish failed)."""
    REPORT = "report"
    """Publish its error event (`error`, `final`), then feed back `Reported` or
    `ReportFailed`."""
    ACK = "ack"
    NAK = "nak"
    """With `delay` seconds (None: at once)."""
    TERM = "term"


@dataclass(frozen=True, slots=True)
class Step:
    phase: Phase
    do: Do
    error: NodeError | None = None
    """REPORT: the outcome to publish; ABORT: the reason, reported once the runtime answers."""
    final: bool = False
    """REPORT: terminate after reporting (False: nak with a growing delay)."""
    last_delivery: bool = False
    """REPORT: a retryable error made final because this was the last delivery."""
    delay: float | None = None


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """A runtime slot is free for it."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Refused at admission, cancelled, or past its deadline: `reason` is its outcome."""

    reason: NodeError


@dataclass(frozen=True, slots=True)
class Answer:
    """The runtime completed its request."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The runtime failed its request."""

    error: NodeError


@dataclass(frozen=True, slots=True)
class Aborted:
    """Its request was cancelled by someone else than this job's stop (the runtime closing)."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """Its result could not be signed: the runtime's output breaks the schema, or is too big."""

    error: NodeError


@dataclass(frozen=True, slots=True)
class Stored:
    """The stream stored its result (or had it already)."""


@dataclass(frozen=True, slots=True)
class StoreFailed:
    """Publish number `tries` of its result failed."""

    error: BaseException
    tries: int


@dataclass(frozen=True, slots=True)
class Reported:
    """Its error event is stored; `final` as the REPORT decision said."""

    final: bool


@dataclass(frozen=True, slots=True)
class ReportFailed:
    """Its error event could not be published."""


@dataclass(frozen=True, slots=True)
class HandBack:
    """Give it back to the stream now, with no error event: it was not at fault."""


Event = (
    Start
    | Stop
    | Answer
    | Failed
    | Aborted
    | Malformed
    | Stored
    | StoreFailed
    | Reported
    | ReportFailed
    | HandBack
)

START, ANSWER, STORED, ABORTED, HAND_BACK, REPORT_FAILED = (
    Start(),
    Answer(),
    Stored(),
    Aborted(),
    HandBack(),
    ReportFailed(),
)


class JobView(Protocol):
    """What `transition` reads of a job."""

    @property
    def phase(self) -> Phase: ...

    @property
    def attempt(self) -> int: ...

    @property
    def reason(self) -> NodeError | None: ...


def nak_delay(attempt: int) -> float:
    return min(NAK_MAX_DELAY_S, NAK_BASE_DELAY_S * 2.0 ** (attempt - 1))


# Module-level names for the members: an enum's attribute lookup costs ~100 ns, and a
# job makes three transitions on its way to a result.
ADMITTED, SUBMITTED, ABORTING, ANSWERED, REPORTING, ACKED, NAKED, TERMED = Phase
_SUBMIT = Step(SUBMITTED, Do.SUBMIT)
_PUBLISH = Step(ANSWERED, Do.PUBLISH)
_ACK = Step(ACKED, Do.ACK)
_NAK_NOW = Step(NAKED, Do.NAK)
_TERM = Step(TERMED, Do.TERM)


def transition(job: JobView, event: Event, max_deliver: int) -> Step:
    """The phase `job` moves to on `event`, and what to do about it. An event that does not
    apply in the job's phase (a cancel once the answer is in, a PubAck after a hand-back)
    changes nothing."""
    phase = job.phase
    kind = type(event)
    if phase is ACKED or phase is NAKED or phase is TERMED:
        return Step(phase, Do.NOTHING)
    if kind is HandBack:
        return _NAK_NOW
    last = job.attempt >= max_deliver
    if phase is SUBMITTED:
        if kind is Answer:
            return _PUBLISH
        if isinstance(event, Stop):
            return Step(ABORTING, Do.ABORT, error=event.reason)
        if isinstance(event, Failed):
            return _report(event.error, last)
        if kind is Aborted:
            return _report(RuntimeFailure("runtime request cancelled"), last)
    elif phase is ADMITTED:
        if kind is Start:
            return _SUBMIT
        if isinstance(event, Stop):
            return _final(event.reason)
    elif phase is ANSWERED:
        if kind is Stored:
            return _ACK
        if isinstance(event, Malformed):
            return _final(event.error)
        if isinstance(event, StoreFailed):
            if event.tries < PUBLISH_ATTEMPTS:
                return Step(ANSWERED, Do.REPUBLISH, delay=0.2 * event.tries)
            if last:  # the last delivery always ends the job, reported
                return _report(RuntimeFailure(f"result not published: {event.error!r}"), last)
            return _NAK_NOW
    elif phase is ABORTING:
        if kind is Answer or kind is Failed or kind is Aborted:
            assert job.reason is not None
            return _final(job.reason)
    elif phase is REPORTING:
        if isinstance(event, Reported):
            if event.final:
                return _TERM
            return Step(NAKED, Do.NAK, delay=nak_delay(job.attempt))
        if kind is ReportFailed:
            # A nak runs the job again and reports it then; but a nak on the last delivery
            # would leave the job in the stream for ever: that one terminates unreported.
            return _TERM if last else _NAK_NOW
    return Step(phase, Do.NOTHING)


def _final(error: NodeError) -> Step:
    """Report `error` and terminate: the job's own fault (refused, cancelled, past its
    deadline, its output malformed), never worth another run."""
    return Step(REPORTING, Do.REPORT, error=error, final=True)


def _report(error: NodeError, last: bool) -> Step:
    """Report `error`: final when the error is, or when this was the last delivery."""
    if not error.retryable:
        return Step(REPORTING, Do.REPORT, error=error, final=True)
    return Step(REPORTING, Do.REPORT, error=error, final=last, last_delivery=last)
