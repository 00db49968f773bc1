"""A runtime request's life: its states, the events that move it, and one pure transition
function from (request, event) to (next state, decisions). No I/O here: the supervisor
feeds events in (frames from the runtime, the runtime lost, the caller's cancel, its run
time spent) and carries the decisions out (send a frame, resolve, fail the job alone, hand
it back once the runtime is replaced, break the runtime).

    WAITING ──dispatch──> SENT ──partial──> GENERATING ──partial──> GENERATING
       │                   │                    │
       │                   └────────┬───────────┘
       │                            ├──done──────────> DONE        (resolve)
       │                            ├──failed────────> FAILED      (the job's own error)
       │                            ├──overrun───────> FAILED      (abort, DeadlineExceeded)
       │                            ├──cancel────────> ABORTED     (abort)
       │                            └──runtime lost──> HANDED_BACK (retryable, once replaced)
       │                                               or FAILED   (a solo request: final)
       ├──cancel─────────> ABORTED
       ├──overrun────────> FAILED
       └──start failed / closing──> HANDED_BACK

A frame that breaks the protocol (a `partial` for a request that does not stream, more
tokens than it asked for, an `aborted` the agent never asked for) leaves the request where
it is and breaks the runtime: the request's outcome is then the runtime's loss. A request
in a final state ignores every event.
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from schemas import frames
from schemas.frames import FailCode, Frame, FrameError
from worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    ItemFailed,
    NodeError,
    OutputMalformed,
    RuntimeBroken,
    RuntimeClosed,
    RuntimeFailure,
    RuntimeStartError,
)
from worker.runtime.api import Completion, Partial

SOLO_AFTER_STRIKES = 2
"""A job in flight at this many runtime failures runs alone next time."""


class State(StrEnum):
    WAITING = "waiting"
    """Admitted; on no runtime yet (none is ready, or it waits for its solo turn)."""
    SENT = "sent"
    """Its `submit` frame is out; nothing has come back yet."""
    GENERATING = "generating"
    """It streams: partials have come back."""
    DONE = "done"
    FAILED = "failed"
    """The job's own outcome is an error (final, or `OutputMalformed`)."""
    ABORTED = "aborted"
    """Its caller gave up on it (job cancelled, deadline, drain)."""
    HANDED_BACK = "handed_back"
    """Its runtime failed or closed under it: a retryable error, once replaced."""


FINAL = frozenset({State.DONE, State.FAILED, State.ABORTED, State.HANDED_BACK})
ON_RUNTIME = frozenset({State.SENT, State.GENERATING})


class RequestView(Protocol):
    """What the transition function reads of a request (the supervisor's record)."""

    @property
    def state(self) -> State: ...
    @property
    def job_id(self) -> str: ...
    @property
    def stream(self) -> bool: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def streamed(self) -> int: ...
    @property
    def solo(self) -> bool: ...


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A ready runtime takes the request now."""


@dataclass(frozen=True, slots=True)
class GotPartial:
    frame: Frame


@dataclass(frozen=True, slots=True)
class GotDone:
    frame: Frame


@dataclass(frozen=True, slots=True)
class GotFailed:
    frame: Frame


@dataclass(frozen=True, slots=True)
class Cancel:
    """The caller cancelled the request's outcome."""


@dataclass(frozen=True, slots=True)
class Overrun:
    """The request ran past its maximum run time while its runtime still answers pings."""

    limit_s: float


@dataclass(frozen=True, slots=True)
class RuntimeLost:
    """The runtime failed (died, hung, broke the protocol) or was closed. `closing`: the
    supervisor is closing, so nothing is retried here."""

    error: RuntimeFailure
    closing: bool = False


@dataclass(frozen=True, slots=True)
class StartFailed:
    """No runtime could be started for the requests waiting for one."""

    error: NodeError


Event = Dispatch | GotPartial | GotDone | GotFailed | Cancel | Overrun | RuntimeLost | StartFailed

DISPATCH = Dispatch()
CANCEL = Cancel()


# -- decisions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendSubmit:
    """Put the request's `submit` frame on the runtime."""


@dataclass(frozen=True, slots=True)
class SendAbort:
    """Stop the request in the engine, and ignore its last frames."""


@dataclass(frozen=True, slots=True)
class Emit:
    """New tokens for the request's sink."""

    partial: Partial


@dataclass(frozen=True, slots=True)
class Resolve:
    completion: Completion


@dataclass(frozen=True, slots=True)
class Fail:
    """The job's own outcome, now; the runtime serves on."""

    error: NodeError


@dataclass(frozen=True, slots=True)
class FailOnceReplaced:
    """The outcome once a fresh runtime has replaced the lost one. `strike`: the job was in
    flight at a runtime failure (counted towards running it alone)."""

    error: NodeError
    strike: bool


@dataclass(frozen=True, slots=True)
class BreakRuntime:
    """The frame broke the protocol: the runtime is failed with `error`."""

    error: RuntimeBroken


Action = SendSubmit | SendAbort | Emit | Resolve | Fail | FailOnceReplaced | BreakRuntime

SEND_SUBMIT = SendSubmit()
SEND_ABORT = SendAbort()


@dataclass(frozen=True, slots=True)
class Step:
    state: State
    streamed: int
    actions: tuple[Action, ...] = ()


def transition(req: RequestView, event: Event) -> Step:
    """The request's next state and what to do about it. Pure: reads `req`, changes
    nothing."""
    state = req.state
    if state in FINAL:
        return Step(state, req.streamed)
    if state is State.WAITING:
        return _waiting(req, event)
    return _on_runtime(req, event)


def _waiting(req: RequestView, event: Event) -> Step:
    kind = type(event)
    if kind is Dispatch:
        return Step(State.SENT, 0, (SEND_SUBMIT,))
    if kind is Cancel:
        return Step(State.ABORTED, 0)
    if isinstance(event, Overrun):
        return Step(State.FAILED, 0, (Fail(_overran(req, event)),))
    if isinstance(event, StartFailed):
        return Step(State.HANDED_BACK, 0, (Fail(handed_back(req.job_id, event.error)),))
    if isinstance(event, RuntimeLost):
        if not event.closing:
            return Step(State.WAITING, 0)  # not on that runtime: it waits for the next
        return Step(State.HANDED_BACK, 0, (Fail(handed_back(req.job_id, event.error)),))
    # a frame for a request no runtime was sent
    assert isinstance(event, GotPartial | GotDone | GotFailed)
    return _broken(req, f"{event.frame.get('t')!r} frame for request of job {req.job_id}, not sent")


def _on_runtime(req: RequestView, event: Event) -> Step:
    state, streamed = req.state, req.streamed
    if isinstance(event, GotDone):
        outcome = _completion(req, event.frame)
        if isinstance(outcome, Completion):
            return Step(State.DONE, streamed, (Resolve(outcome),))
        return Step(State.FAILED, streamed, (Fail(outcome),))
    if isinstance(event, GotPartial):
        return _partial(req, event.frame)
    if isinstance(event, GotFailed):
        try:
            failed = frames.parse_failed(event.frame)
        except FrameError as exc:
            return _broken(req, f"bad 'failed' frame: {exc}")
        if failed["code"] == FailCode.ABORTED:
            return _broken(req, f"runtime aborted the request of job {req.job_id} on its own")
        return Step(
            State.FAILED, streamed, (Fail(_failure(req, failed["code"], failed["reason"])),)
        )
    if isinstance(event, Cancel):
        return Step(State.ABORTED, streamed, (SEND_ABORT,))
    if isinstance(event, Overrun):
        return Step(State.FAILED, streamed, (SEND_ABORT, Fail(_overran(req, event))))
    if isinstance(event, RuntimeLost):
        lost = event.error
        if event.closing or isinstance(lost, RuntimeClosed):
            return Step(
                State.HANDED_BACK,
                streamed,
                (FailOnceReplaced(handed_back(req.job_id, lost), strike=False),),
            )
        if req.solo:
            poison = ItemFailed(
                f"job {req.job_id} was in flight at {SOLO_AFTER_STRIKES + 1} runtime failures, "
                f"the last time alone ({type(lost).__name__}: {lost})"
            )
            return Step(State.FAILED, streamed, (FailOnceReplaced(poison, strike=False),))
        return Step(
            State.HANDED_BACK,
            streamed,
            (FailOnceReplaced(handed_back(req.job_id, lost), strike=True),),
        )
    return Step(state, streamed)  # Dispatch or StartFailed: not for a request on a runtime


def _partial(req: RequestView, frame: Frame) -> Step:
    try:
        part = frames.parse_partial(frame)
    except FrameError as exc:
        return _broken(req, f"bad 'partial' frame: {exc}")
    if not req.stream:
        return _broken(req, f"'partial' for the request of job {req.job_id}, which does not stream")
    streamed = req.streamed + len(part["token_ids"])
    if streamed > req.max_tokens:
        return _broken(
            req, f"job {req.job_id} streamed {streamed} tokens, max_tokens is {req.max_tokens}"
        )
    return Step(State.GENERATING, streamed, (Emit(Partial(part["token_ids"], part["text"])),))


def _broken(req: RequestView, why: str) -> Step:
    return Step(req.state, req.streamed, (BreakRuntime(RuntimeBroken(why)),))


def _completion(req: RequestView, frame: Frame) -> Completion | NodeError:
    try:
        done = frames.parse_done(frame)
    except FrameError as exc:
        return OutputMalformed(f"job {req.job_id}: {exc}")
    tokens = len(done["token_ids"])
    if req.streamed > tokens:
        return OutputMalformed(
            f"job {req.job_id}: {req.streamed} tokens streamed, {tokens} in done"
        )
    if tokens > req.max_tokens:
        return OutputMalformed(f"job {req.job_id}: {tokens} tokens, max_tokens is {req.max_tokens}")
    logprobs = done.get("logprobs")
    return Completion(
        job_id=req.job_id,
        text=done["text"],
        token_ids=done["token_ids"],
        finish_reason=done["finish_reason"],
        prompt_tokens=done["prompt_tokens"],
        first_token_s=done["first_token_s"],
        logprobs=[dict(e) for e in logprobs] if logprobs is not None else None,
    )


def _failure(req: RequestView, code: str, reason: str) -> NodeError:
    message = f"job {req.job_id}: {reason[:1000]}"
    if code == FailCode.BAD_REQUEST:
        return BadRequest(message)
    if code == FailCode.DEADLINE:
        return DeadlineExceeded(message)
    return ItemFailed(f"job {req.job_id}: engine error: {reason[:1000]}")


def _overran(req: RequestView, event: Overrun) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"job {req.job_id} ran longer than request_timeout_s={event.limit_s}s: aborted"
    )


def handed_back(job_id: str, exc: NodeError) -> NodeError:
    """A fresh error of the same class for this job, retryable: a runtime this node refuses
    to run (`RuntimeRefused`: final for the node) is not the job's fault, so its jobs get a
    `RuntimeStartError`, and another node may run them."""
    cls: type[NodeError] = type(exc) if exc.retryable else RuntimeStartError
    return cls(f"job {job_id}: {exc}")
