"""The runtime supervisor: keeps exactly one runtime running, hands it requests, and
replaces it when it crashes, hangs, or talks nonsense.

A runtime is trusted for nothing: every frame is parsed, every write and every wait has a
deadline, pings go out while requests run (a runtime hung mid-generation is found by the
ping timeout), and a runtime that breaks any rule is killed and removed before a fresh one
starts. A runtime that answers pings is healthy: a request that runs longer than
`request_timeout_s` is aborted alone (`DeadlineExceeded`) and the runtime serves on.

Each request is one record (`Request`, which is also its caller's future) moved by the
pure `worker.runtime.request.transition`; this module is the I/O around it: it turns frames,
cancels, timers and runtime failures into events and carries out the decisions. Requests
in flight on a runtime that fails come back as retryable `RuntimeFailure`s once a fresh
runtime replaced it (the pipeline hands their jobs back). A job that was in flight at
`SOLO_AFTER_STRIKES` runtime failures runs alone next time (no other request on the
runtime); if the runtime fails again it fails alone (`ItemFailed`, final) and no other job
is failed because of it. A gate (`gate`: the agent's model vectors) may stand on the
request path: a restarted (or replaced) runtime takes requests only once its check has passed.
"""

import asyncio
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import cast

from schemas import frames
from schemas.frames import PROTOCOL_VERSION, EngineStats, Frame, FrameError, FrameKind
from schemas.limits import max_tokens
from worker.core.deadlines import Deadlines
from worker.core.errors import (
    ModelInvalid,
    NodeError,
    RuntimeBroken,
    RuntimeClosed,
    RuntimeEnded,
    RuntimeFailure,
    RuntimeStartError,
    RuntimeTimeout,
)
from worker.core.resource import AsyncResource
from worker.core.settings import Settings
from worker.runtime.api import (
    Completion,
    Device,
    ItemOutcome,
    LaunchSpec,
    PartialSink,
    Runtime,
    RuntimeFacts,
    WorkItem,
)
from worker.runtime.process import ProcessBackend
from worker.runtime.request import (
    CANCEL,
    DISPATCH,
    FINAL,
    SEND_ABORT,
    SEND_SUBMIT,
    SOLO_AFTER_STRIKES,
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
    transition,
)
from worker.runtime.transport import Backend, RuntimeHandle

log = logging.getLogger(__name__)

MAX_SUSPECTS = 4096
MAX_ABORTED = 4096


@dataclass(frozen=True, slots=True)
class SupervisorStats:
    state: str
    backend: str
    runtime_id: str | None
    restarts: int
    requests: int
    active: int
    aborting: int
    uptime_s: float
    ping_rtt_ms: float | None = None
    """The last ping's round trip (None before the first `pong`)."""
    engine: EngineStats | None = None
    """The engine's figures from the last `pong` (`schemas.frames.EngineStats`)."""


class Request(asyncio.Future[Completion]):
    """One request: its record (state, tokens streamed, the runtime it is on) and its
    caller's future in one object. Cancelling it aborts the request: the supervisor hears
    of the cancel here, and of the answer from the frame reader, so no task and no done
    callback runs per request."""

    __slots__ = (
        "_owner",
        "item",
        "job_id",
        "max_tokens",
        "released",
        "request_id",
        "session",
        "sink",
        "solo",
        "state",
        "stream",
        "streamed",
        "gated",
    )

    def __init__(
        self,
        owner: "Supervisor",
        request_id: int,
        item: WorkItem,
        sink: PartialSink | None,
        *,
        solo: bool,
        loop: asyncio.AbstractEventLoop,
        gated: bool = True,
    ) -> None:
        super().__init__(loop=loop)
        self._owner: Supervisor | None = owner
        self.request_id = request_id
        self.item = item
        self.job_id = item.job_id
        self.stream = item.stream
        self.max_tokens = max_tokens(item.request.get("params", {}))
        self.sink = sink
        self.solo = solo
        self.state = State.WAITING
        self.streamed = 0
        self.session: _Session | None = None
        self.released = False
        """Its place among the supervisor's active requests was given up."""
        self.gated = gated
        """It waits for the gate (`Supervisor.gate`) after a restart; the gate's own check
        does not."""

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        owner = self._owner
        if owner is not None:
            try:
                owner._cancelled(self)
            except Exception:  # a bug: the caller's cancel (a task's, gather's) goes on
                log.exception("request_cancel_failed job_id=%s", self.job_id)
        return True


@dataclass(eq=False)
class _Session:
    """One runtime from launch to removal, and the requests and pings on it."""

    handle: RuntimeHandle
    spec: LaunchSpec
    ready: "asyncio.Future[Frame]"
    deadlines: "Deadlines[int, Request]"
    """The run time limits of the requests on it (`request_timeout_s` each, one timer)."""
    requests: dict[int, Request] = field(default_factory=dict)
    """The requests on this runtime, in the order they were sent."""
    pings: "dict[int, asyncio.Future[Frame]]" = field(default_factory=dict)
    aborted: dict[int, None] = field(default_factory=dict)
    """Requests aborted by the agent, oldest first (an ordered set)."""
    serving: bool = False
    """It said `ready`, the facts were accepted, and it has not failed: requests go to it."""
    failure: RuntimeFailure | None = None
    reader: "asyncio.Task[None] | None" = None
    started_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    pinged_at: float = field(default_factory=time.monotonic)
    ping_rtt_ms: float | None = None
    engine_stats: EngineStats | None = None
    """From the last `pong`."""
    overdue: dict[int, Request] = field(default_factory=dict)
    """Requests past their limit: the next ping decides whether they alone are aborted."""
    draining: "asyncio.Task[None] | None" = None
    """The task waiting for a full input buffer to drain (frames posted without waiting)."""

    def forget_later(self, request_id: int) -> None:
        """Remember an aborted request, so its last frames are ignored; bounded, since a
        request whose `submit` never reached the runtime never sends one."""
        self.aborted[request_id] = None
        while len(self.aborted) > MAX_ABORTED:
            del self.aborted[next(iter(self.aborted))]


@dataclass(eq=False)
class _Gate:
    """A check every restarted or replaced runtime passes before gated requests reach it."""

    check: "Callable[[Runtime], Awaitable[object]]"
    on_invalid: "Callable[[ModelInvalid], None] | None"
    passed: int
    """The number (`Supervisor._runtimes`) of the last runtime that passed (or was taken as
    checked)."""
    task: "asyncio.Task[None] | None" = None


class Supervisor(AsyncResource):
    """Runs one runtime at a time through `backend`. Use as `async with Supervisor(...)`."""

    def __init__(self, settings: Settings, backend: Backend, spec: LaunchSpec) -> None:
        super().__init__()
        self._settings = settings
        self._backend = backend
        self._spec = spec
        self._tg: asyncio.TaskGroup | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._session: _Session | None = None
        self._facts: RuntimeFacts | None = None
        self._ids = itertools.count(1)
        self._suspects: OrderedDict[str, int] = OrderedDict()
        self._restarts = 0
        self._runtimes = 0
        """Runtimes that became ready (restarted or replaced): what the gate counts."""
        self._requests = 0
        self._opened_at = 0.0
        self._active = 0
        """Requests admitted and not yet ended (waiting ones included)."""
        self._waiting: dict[Request, None] = {}
        """Requests on no runtime yet, oldest first (an ordered set)."""
        self._solo: Request | None = None
        """The request running alone, if one does."""
        self._gate: _Gate | None = None

    # -- resource --------------------------------------------------------------------

    async def _open(self, stack: AsyncExitStack) -> None:
        self._opened_at = time.monotonic()
        stack.push_async_callback(self._backend.aclose)
        self._tg = await stack.enter_async_context(asyncio.TaskGroup())
        removed = await self._backend.remove_leftovers()
        if removed:
            log.warning("runtime_leftovers_removed count=%d", removed)
        async with self._lock:
            await self._start(self._spec)
        self._watcher = self._tg.create_task(self._watch(), name="runtime-watch")

    async def _close(self) -> None:
        # Shutdown sequence, each step bounded; then the stack closes the task group (its
        # tasks are all ending by now) and the backend:
        # (1) state CLOSING (set by AsyncResource): no new request starts;
        # (2) stop the watcher, so no ping or restart races the shutdown;
        # (3) hand back the requests in flight and waiting: they end as `RuntimeClosed`
        #     (retryable) at once instead of after their deadline;
        # (4) stop the runtime: `shutdown` frame, up to runtime_stop_timeout_s to exit,
        #     then kill and remove (uncancellable: a cancelled close still removes it).
        if self._watcher is not None:
            self._watcher.cancel()
        closed = RuntimeClosed("the supervisor is closing")
        if self._session is not None:
            self._fail_session(self._session, closed)
        for req in list(self._waiting):
            self._step(req, RuntimeLost(closed, closing=True))
        async with self._lock:
            session = self._session
            if session is not None:
                await self._discard(session, "supervisor closing", graceful=True)
        log.info("supervisor_closed restarts=%d requests=%d", self._restarts, self._requests)

    # -- public surface --------------------------------------------------------------

    @property
    def facts(self) -> RuntimeFacts:
        if self._facts is None:
            raise RuntimeStartError("no runtime has become ready yet")
        return self._facts

    @property
    def restarts(self) -> int:
        """How many times a runtime was started after the first."""
        return self._restarts

    def stats(self) -> SupervisorStats:
        session = self._session
        return SupervisorStats(
            state=self.state.value,
            backend=self._backend.name,
            runtime_id=session.handle.ident if session else None,
            restarts=self._restarts,
            requests=self._requests,
            active=self._active,
            aborting=len(session.aborted) if session else 0,
            uptime_s=time.monotonic() - self._opened_at if self._opened_at else 0.0,
            ping_rtt_ms=session.ping_rtt_ms if session else None,
            engine=session.engine_stats if session else None,
        )

    def gate(
        self,
        check: "Callable[[Runtime], Awaitable[object]] | None",
        on_invalid: "Callable[[ModelInvalid], None] | None" = None,
    ) -> None:
        """From now on, a runtime started after this call takes requests only once
        `check(runtime)` passed on it (the model's validation vectors, run through a view of
        this supervisor that skips the gate); the runtime in service now is taken as
        checked. Requests wait meanwhile; a check that raises hands them back (retryable),
        and a `ModelInvalid` goes to `on_invalid` as well. `None` removes the gate."""
        self._gate = None if check is None else _Gate(check, on_invalid, self._runtimes)
        if self._waiting:
            self._dispatch_waiting()

    def submit(
        self, item: WorkItem, on_partial: PartialSink | None = None, *, gated: bool = True
    ) -> Request:
        """Start one request; the returned future completes with its `Completion` or fails
        with a `NodeError` (a retryable `RuntimeFailure` means the job may be tried again),
        and cancelling it aborts the request. No task runs it: with a runtime ready and no
        solo request about, its `submit` frame goes out in this call; otherwise it waits for
        its turn, and the runtime's reader and the supervisor's own tasks move it on."""
        self._check_open()
        solo = bool(self._suspects) and self._suspects.get(item.job_id, 0) >= SOLO_AFTER_STRIKES
        loop = asyncio.get_running_loop()
        req = Request(self, next(self._ids), item, on_partial, solo=solo, loop=loop, gated=gated)
        self._active += 1
        session = self._session
        if (
            session is not None
            and session.serving
            and not solo
            and self._solo is None
            and not self._waiting
            and (self._gate is None or not gated or self._gate.passed == self._runtimes)
        ):
            self._step(req, DISPATCH, session)
        else:
            self._waiting[req] = None
            if session is not None and session.serving:
                self._dispatch_waiting()  # a solo turn: it goes now if nothing else runs
            else:
                self._wake.set()  # the watcher starts a runtime, which takes the waiting
        return req

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        """`submit`, awaited: cancelling the call aborts the request."""
        return await self.submit(item, on_partial)

    async def run(self, items: Sequence[WorkItem]) -> list[ItemOutcome]:
        """Each item `submit`ted, concurrently; one outcome per item, in order."""
        return await _gather(self.submit, items)

    async def replace(self, spec: LaunchSpec) -> RuntimeFacts:
        """Stop the current runtime and start one from `spec` (a new configuration)."""
        self._check_open()
        async with self._lock:
            self._check_open()
            self._spec = spec
            old = self._session
            if old is not None:
                await self._discard(old, "replaced by a new configuration", graceful=True)
            facts = await self._start(spec)
            log.info(
                "runtime_replaced runtime=%s engine=%s image=%s",
                self.stats().runtime_id,
                facts.engine,
                facts.image,
            )
            return facts

    # -- requests: events in, decisions out ------------------------------------------

    def _step(
        self, req: Request, event: Event, session: "_Session | None" = None
    ) -> FailOnceReplaced | None:
        """Move `req` by `event` and carry out the decisions; a `FailOnceReplaced` is
        returned for the caller to carry out (see `_fail_session`). Raises `RuntimeBroken`
        when the event was a frame that broke the protocol (the reader fails the runtime)."""
        deferred = None
        before = req.state
        step = transition(req, event)
        req.state = step.state
        req.streamed = step.streamed
        if step.state in FINAL:
            if before is State.WAITING:
                self._waiting.pop(req, None)
            elif req.session is not None:
                req.session.requests.pop(req.request_id, None)
                req.session.deadlines.pop(req.request_id)
        for action in step.actions:
            if action is SEND_SUBMIT:
                assert session is not None
                self._send(session, req)
            elif type(action) is Emit:
                if req.sink is not None:
                    try:
                        req.sink(action.partial)
                    except Exception:
                        log.exception("partial_sink_failed job_id=%s", req.job_id)
            elif type(action) is Resolve:
                if not req.done():
                    req.set_result(action.completion)
                self._requests += 1
                self._end(req)
            elif type(action) is Fail:
                self._settle(req, action.error)
            elif action is SEND_ABORT:
                self._send_abort(req)
            elif type(action) is FailOnceReplaced:
                deferred = action
            elif type(action) is BreakRuntime:
                raise action.error
        return deferred

    def _send(self, session: "_Session", req: Request) -> None:
        req.session = session
        session.requests[req.request_id] = req
        session.deadlines.watch(req.request_id, req)
        item = req.item
        frame = frames.submit(
            req.request_id, item.request, stream=item.stream, deadline=item.deadline
        )
        self._post(session, frame)

    def _send_abort(self, req: Request) -> None:
        session = req.session
        if session is None or session.failure is not None:
            return
        session.forget_later(req.request_id)
        if self.is_open:
            self._post(session, frames.abort(req.request_id))

    def _settle(self, req: Request, error: NodeError) -> None:
        if not req.done():
            req.set_exception(error)
        self._end(req)

    def _end(self, req: Request) -> None:
        """The request's outcome is set (or it was cancelled): its place is released, once,
        and the next waiting request may go."""
        if req.released:
            return
        req.released = True
        # The record refers back to the supervisor and its runtime: dropped here, so that a
        # finished request is freed at once, not left in a reference cycle for the garbage
        # collector (under CPython's default thresholds that cost a quarter more CPU).
        req._owner = None
        req.session = None
        self._active -= 1
        if self._suspects and req.state is not State.HANDED_BACK:
            self._suspects.pop(req.job_id, None)
        if req is self._solo:
            self._solo = None
        if self._waiting:
            self._dispatch_waiting()

    def _cancelled(self, req: Request) -> None:
        """Its caller cancelled it (job cancelled, deadline, drain)."""
        self._step(req, CANCEL)
        self._end(req)

    def _dispatch_waiting(self) -> None:
        """Send waiting requests, oldest first, to a serving runtime: a solo request goes
        once nothing else runs, and nothing goes while it runs."""
        session = self._session
        if session is None or not session.serving:
            return
        gate = self._gate
        if gate is not None and gate.passed != self._runtimes:
            for req in [r for r in self._waiting if not r.gated]:  # the gate's own check
                del self._waiting[req]
                self._step(req, DISPATCH, session)
            if self._waiting and gate.task is None and self.is_open and self._tg is not None:
                gate.task = self._tg.create_task(self._pass_gate(gate))
            return
        while self._waiting and self._solo is None:
            req = next(iter(self._waiting))
            if req.solo:
                if self._active > len(self._waiting):  # others still run
                    return
                self._solo = req
            del self._waiting[req]
            self._step(req, DISPATCH, session)

    async def _pass_gate(self, gate: _Gate) -> None:
        """Run the gate's check on the runtime in service, until one passes it; then the
        waiting requests go. Never raises: an error here would end the task group."""
        try:
            while self.is_open and self._gate is gate and gate.passed != self._runtimes:
                runtime = self._runtimes
                try:
                    await gate.check(_Ungated(self))
                except Exception as exc:
                    if self._gate is not gate:
                        return  # removed or replaced meanwhile: the verdict is not its to give
                    log.warning("runtime_gate_refused error=%s", exc)
                    if isinstance(exc, ModelInvalid) and gate.on_invalid is not None:
                        try:
                            gate.on_invalid(exc)
                        except Exception:  # a bug; its requests are still handed back
                            log.exception("runtime_gate_on_invalid_failed")
                    refused = StartFailed(RuntimeStartError(f"runtime not validated: {exc}"))
                    for req in [r for r in self._waiting if r.gated]:
                        self._step(req, refused)
                    return
                if self._runtimes == runtime:
                    gate.passed = runtime
        finally:
            gate.task = None
        if self._waiting:
            self._dispatch_waiting()

    def _strike(self, job_id: str) -> None:
        strikes = self._suspects.pop(job_id, 0) + 1
        self._suspects[job_id] = strikes
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)

    def _expired(self, request_id: int, req: Request) -> None:
        """A request's run time limit is due (`_Session.deadlines`): the watcher pings the
        runtime now. If it answers, it is healthy and the requests past their limit are
        aborted alone (`_abort_overdue`); if not, it is replaced and they are handed back
        with the rest."""
        session = req.session
        if session is not None and session.failure is None:
            session.overdue[request_id] = req
            self._wake.set()

    def _abort_overdue(self, session: "_Session") -> None:
        overdue, session.overdue = session.overdue, {}
        limit = Overrun(self._settings.request_timeout_s)
        for req in overdue.values():
            if req.session is not session or req.state in FINAL:
                continue  # answered (or cancelled) while the ping was out
            log.warning("runtime_request_overran job_id=%s limit_s=%s", req.job_id, limit.limit_s)
            self._step(req, limit)

    # -- runtimes --------------------------------------------------------------------

    def _deliver(self, session: "_Session", frame: Frame) -> None:
        """One frame from the runtime. Raises `RuntimeFailure` when the runtime broke the
        protocol: the reader then fails the whole session."""
        session.last_active = time.monotonic()
        kind = frame["t"]
        try:
            if not session.ready.done():
                if kind != FrameKind.READY:
                    raise RuntimeBroken(f"first frame is {kind!r}, expected 'ready'")
                session.ready.set_result(frame)
            elif kind == FrameKind.READY:
                raise RuntimeBroken("second 'ready' frame")
            elif kind == FrameKind.FATAL:
                message = frames.parse_fatal(frame)["message"]
                raise RuntimeEnded(f"runtime reported fatal: {message[:500]}")
            elif kind == FrameKind.PONG:
                future = session.pings.pop(frames.parse_pong(frame)["id"], None)
                if future is None:
                    raise RuntimeBroken(f"'pong' for unknown ping {frame.get('id')!r}")
                if not future.done():
                    future.set_result(frame)
            else:
                self._request_frame(session, kind, frame)
        except FrameError as exc:
            raise RuntimeBroken(f"bad {kind!r} frame: {exc}") from exc

    def _request_frame(self, session: "_Session", kind: str, frame: Frame) -> None:
        request_id = frame.get("id")
        if not isinstance(request_id, int):
            raise RuntimeBroken(f"{kind!r} frame without a request id")
        req = session.requests.get(request_id)
        if req is None:
            if request_id in session.aborted:
                if kind != FrameKind.PARTIAL:
                    session.aborted.pop(request_id, None)  # its last frame: forget it
                return
            raise RuntimeBroken(f"{kind!r} frame for unknown request {request_id}")
        if kind == FrameKind.PARTIAL:
            self._step(req, GotPartial(frame))
        elif kind == FrameKind.DONE:
            self._step(req, GotDone(frame))
        else:
            self._step(req, GotFailed(frame))

    def _fail_session(self, session: "_Session", exc: RuntimeFailure) -> None:
        """The runtime failed or is being closed: its pings and its requests learn it; the
        requests' outcomes wait until a fresh runtime replaced it (`_recover_then_settle`)."""
        if session.failure is None:
            session.failure = exc
        session.serving = False
        session.deadlines.close()
        session.overdue.clear()
        for future in [session.ready, *session.pings.values()]:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the waiter may be gone; never "never retrieved"
        session.pings.clear()
        requests = list(session.requests.values())
        session.requests.clear()
        event = RuntimeLost(exc, closing=not self.is_open)
        lost = []
        for req in requests:
            action = self._step(req, event)
            if action is not None:
                lost.append((req, action))
        self._wake.set()
        if not lost:
            return
        if self.is_open and self._tg is not None:
            self._tg.create_task(self._recover_then_settle(session, exc, lost))
        else:
            self._settle_lost(lost)

    async def _recover_then_settle(
        self,
        session: "_Session",
        exc: RuntimeFailure,
        lost: list[tuple[Request, FailOnceReplaced]],
    ) -> None:
        # Never raises: an error here would end the supervisor's task group.
        try:
            await self._recover(session, exc)
        except Exception:
            log.exception("runtime_recover_failed runtime=%s", session.handle.ident[:12])
        finally:
            self._settle_lost(lost)

    def _settle_lost(self, lost: list[tuple[Request, FailOnceReplaced]]) -> None:
        for req, action in lost:
            if action.strike and self.is_open and not req.done():
                self._strike(req.job_id)
            self._settle(req, action.error)

    def _post(self, session: "_Session", frame: object) -> None:
        """Queue a frame without waiting. When the runtime's input buffer is over its limit,
        one task waits for it to drain and fails the session if it does not within
        `runtime_write_timeout_s` (a runtime that stops reading its input is broken); a
        frame that cannot be queued (input closed, not encodable) fails the session now.
        Either way the session's requests and pings learn it from the session."""
        try:
            if session.handle.write(frame) or session.draining is not None:  # type: ignore[arg-type]
                return
        except Exception as exc:
            kind = frame.get("t") if isinstance(frame, dict) else None
            self._fail_session(
                session,
                exc
                if isinstance(exc, RuntimeFailure)
                else RuntimeBroken(f"{kind!r} frame not sent: {exc!r}"),
            )
            return
        assert self._tg is not None
        session.draining = self._tg.create_task(self._drain_or_fail(session))

    async def _drain_or_fail(self, session: "_Session") -> None:
        timeout_s = self._settings.runtime_write_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await session.handle.drained()
        except TimeoutError:
            self._fail_session(
                session,
                RuntimeTimeout(
                    f"runtime {session.handle.ident[:12]} took no input for "
                    f"runtime_write_timeout_s={timeout_s}s"
                ),
            )
        except RuntimeFailure as exc:
            self._fail_session(session, exc)
        finally:
            session.draining = None

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeClosed(f"the supervisor is {self.state.value}")

    async def _start(self, spec: LaunchSpec) -> RuntimeFacts:
        """Launch a runtime and wait for its `ready` (caller holds the lock); then the
        waiting requests go to it. When it cannot start, they are handed back."""
        try:
            facts = await self._launch(spec)
        except NodeError as exc:
            for req in list(self._waiting):
                self._step(req, StartFailed(exc))
            raise
        self._dispatch_waiting()
        return facts

    async def _launch(self, spec: LaunchSpec) -> RuntimeFacts:
        assert self._tg is not None
        timeout_s = self._settings.runtime_ready_timeout_s
        handle = await self._backend.launch(spec)
        loop = asyncio.get_running_loop()
        session = _Session(
            handle=handle,
            spec=spec,
            ready=loop.create_future(),
            deadlines=Deadlines(self._settings.request_timeout_s, self._expired),
        )
        self._session = session
        try:
            if not self.is_open:
                raise RuntimeClosed("the supervisor closed while the runtime started")
            session.reader = self._tg.create_task(self._read(session))
            try:
                async with asyncio.timeout(timeout_s):
                    ready = await asyncio.shield(session.ready)
            except TimeoutError as exc:
                raise RuntimeStartError(
                    f"runtime {handle.ident[:12]} sent no 'ready' frame within "
                    f"runtime_ready_timeout_s={timeout_s}s: raise "
                    "RESULTITY_RUNTIME_READY_TIMEOUT_S if the model needs longer to load, "
                    "otherwise see the runtime_log lines above"
                ) from exc
            except RuntimeFailure as exc:
                if isinstance(exc, RuntimeStartError | RuntimeClosed):
                    raise
                raise RuntimeStartError(
                    f"runtime {handle.ident[:12]} failed before 'ready': {exc}"
                ) from exc
            facts = check_ready(ready, spec)
        except BaseException as exc:
            await self._discard(session, f"start failed: {exc!r}", graceful=False)
            raise
        self._facts = facts
        self._runtimes += 1
        session.serving = session.failure is None
        log.info(
            "runtime_ready runtime=%s engine=%s engine_version=%s device=%s max_active=%d",
            handle.ident[:12],
            facts.engine,
            facts.engine_version,
            facts.device,
            facts.max_active,
        )
        return facts

    async def _read(self, session: "_Session") -> None:
        """The session's reader task: frames to requests and waiters until the runtime ends."""
        try:
            await session.handle.pump(functools.partial(self._deliver, session))
        except RuntimeFailure as exc:
            self._fail_session(session, exc)
        except asyncio.CancelledError:
            self._fail_session(session, RuntimeClosed("runtime reader stopped"))
            raise
        except Exception as exc:  # a bug; still the runtime must be replaced
            log.exception("runtime_reader_crashed runtime=%s", session.handle.ident[:12])
            self._fail_session(session, RuntimeBroken(f"reader crashed: {exc!r}"))

    async def _discard(self, session: "_Session", why: str, *, graceful: bool) -> None:
        """Stop and remove one runtime (completes even if cancelled)."""
        if self._session is session:
            self._session = None
        self._fail_session(session, RuntimeClosed(why))
        grace_s = self._settings.runtime_stop_timeout_s if graceful else 0.0
        try:
            await session.handle.aclose(grace_s=grace_s)
        finally:
            if session.reader is not None:
                session.reader.cancel()
        log.info("runtime_stopped runtime=%s why=%s", session.handle.ident[:12], why)

    async def _recover(self, session: "_Session", exc: RuntimeFailure) -> None:
        """Replace a runtime that broke a rule, once however many requests saw it break.
        A failed restart is logged; the next request or the watcher tries again."""
        async with self._lock:
            if self._session is not session:
                return
            await self._retire(session, exc)
            if not self.is_open:
                return
            self._restarts += 1
            try:
                await self._start(self._spec)
            except NodeError as start_exc:
                log.error("runtime_restart_failed error=%s", start_exc)

    async def _retire(self, session: "_Session", exc: RuntimeFailure) -> None:
        """Log why a runtime failed, then remove it (caller holds the lock)."""
        status = await session.handle.exit_status() if isinstance(exc, RuntimeEnded) else ""
        log.warning(
            "runtime_failed runtime=%s error=%s reason=%s %s",
            session.handle.ident[:12],
            type(exc).__name__,
            exc,
            status,
        )
        await self._discard(session, f"{type(exc).__name__}: {exc}", graceful=False)

    async def _ensure_session(self) -> None:
        """A serving runtime, unless it cannot start (caller holds the lock)."""
        session = self._session
        if session is not None and session.failure is not None:
            await self._retire(session, session.failure)
            session = None
        if session is None:
            self._restarts += 1
            await self._start(self._spec)

    async def _watch(self) -> None:
        """Start a runtime when none serves (it died, or requests wait for one); ping it
        every `ping_interval_s`, also while it runs requests (a hung engine step answers no
        ping; each `pong` brings the engine's figures, kept for `stats`), and at once when
        a request is past its run time."""
        interval_s = self._settings.ping_interval_s
        while self.is_open:
            try:
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.is_open:
                return
            try:
                await self._check()
            except NodeError as exc:
                log.error("runtime_unavailable error=%s", exc)
            except Exception:
                log.exception("supervisor_watch_crashed")

    async def _check(self) -> None:
        session = self._session
        if session is None or session.failure is not None:
            async with self._lock:
                if self.is_open:
                    await self._ensure_session()
            return
        now, interval_s = time.monotonic(), self._settings.ping_interval_s
        if (
            not session.overdue
            and now - session.last_active < interval_s
            and now - session.pinged_at < interval_s
        ):
            return  # busy and its figures fresh: frames show it alive
        session.pinged_at = now
        ping_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        session.pings[ping_id] = future
        timeout_s = self._settings.ping_timeout_s
        try:
            self._post(session, frames.ping(ping_id))
            async with asyncio.timeout(timeout_s):
                pong = frames.parse_pong(await asyncio.shield(future))
            session.ping_rtt_ms = round((time.monotonic() - now) * 1000, 3)
            session.engine_stats = pong.get("stats")
        except TimeoutError:
            exc: RuntimeFailure = RuntimeTimeout(
                f"no 'pong' within ping_timeout_s={timeout_s}s (hung runtime?)"
            )
            self._fail_session(session, exc)
            await self._recover(session, exc)
        except RuntimeFailure as failure:
            await self._recover(session, failure)
        else:
            if session.overdue:
                self._abort_overdue(session)
        finally:
            session.pings.pop(ping_id, None)


class _Ungated:
    """The supervisor as its gate's check sees it: its requests skip the gate."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    @property
    def facts(self) -> RuntimeFacts:
        return self._sup.facts

    def submit(self, item: WorkItem, on_partial: PartialSink | None = None) -> Request:
        return self._sup.submit(item, on_partial, gated=False)

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        return await self.submit(item, on_partial)

    async def run(self, items: Sequence[WorkItem]) -> list[ItemOutcome]:
        return await _gather(self.submit, items)


async def _gather(
    submit: Callable[[WorkItem], "asyncio.Future[Completion]"], items: Sequence[WorkItem]
) -> list[ItemOutcome]:
    """Each item submitted, concurrently; one outcome per item, in order."""
    futures: list[asyncio.Future[Completion]] = []
    for item in items:
        try:
            futures.append(submit(item))
        except NodeError as exc:
            failed: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            futures.append(failed)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, NodeError):
            raise outcome
    return cast(list[ItemOutcome], outcomes)


def check_ready(frame: Frame, spec: LaunchSpec) -> RuntimeFacts:
    """The facts of a `ready` frame; `RuntimeStartError` if it is not one this agent takes."""
    proto = frame.get("proto")
    if proto != PROTOCOL_VERSION:
        raise RuntimeStartError(
            f"runtime speaks frame protocol {proto!r}, this agent speaks {PROTOCOL_VERSION}: "
            "run a runtime image built for this agent version"
        )
    try:
        ready = frames.parse_ready(frame)
    except FrameError as exc:
        raise RuntimeStartError(f"bad 'ready' frame: {exc}") from exc
    if spec.model_sha256 and ready["model_sha256"] != spec.model_sha256:
        raise RuntimeStartError(
            f"runtime loaded model {ready['model_sha256']}, expected {spec.model_sha256}"
        )
    return RuntimeFacts(
        engine=ready["engine"],
        engine_version=ready["engine_version"],
        model_sha256=ready["model_sha256"],
        device=ready["device"],
        image=spec.image,
        max_active=ready["max_active"],
        devices=tuple(Device(**d) for d in ready["devices"]),
        execution_class=spec.execution_class,
    )


def create_backend(settings: Settings, *, node_id: str) -> Backend:
    """The backend `settings.runtime_backend` names: "docker" (isolated) or "process"
    (local child process, not isolated: development only)."""
    if settings.runtime_backend == "docker":
        from worker.runtime.container import DockerBackend

        return DockerBackend(settings, node_id=node_id)

    log.warning("runtime_backend_not_isolated backend=process")
    return ProcessBackend(settings)
