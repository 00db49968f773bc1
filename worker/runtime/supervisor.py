"""The runtime supervisor: keeps exactly one runtime running, hands it requests one by one,
and replaces it when it crashes, hangs, or talks nonsense.

A runtime is trusted for nothing: every frame is parsed, every write and every wait has a
deadline, pings go out while requests run (a runtime hung mid-generation is found by the
ping timeout), and a runtime that breaks any rule is killed and removed before a fresh one
starts. Requests in flight on a runtime that dies come back as retryable `RuntimeFailure`s
(the pipeline hands their jobs back). A job that was in flight at `SOLO_AFTER_STRIKES`
runtime deaths runs alone next time (no other request on the runtime); if the runtime dies
again it fails alone (`ItemFailed`, final) and no other job is failed because of it.
"""

import asyncio
import functools
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import cast

from schemas import frames
from schemas.frames import PROTOCOL_VERSION, EngineStats, FailCode, Frame, FrameError, FrameKind
from schemas.limits import DEFAULT_MAX_TOKENS
from worker.core.errors import (
    BadRequest,
    DeadlineExceeded,
    ItemFailed,
    NodeError,
    OutputMalformed,
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
    ItemOutcome,
    LaunchSpec,
    Partial,
    PartialSink,
    RuntimeFacts,
    WorkItem,
)
from worker.runtime.process import ProcessBackend
from worker.runtime.transport import Backend, RuntimeHandle

log = logging.getLogger(__name__)

MAX_SUSPECTS = 4096
MAX_ABORTED = 4096
SOLO_AFTER_STRIKES = 2


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


@dataclass(eq=False)
class _Request:
    request_id: int
    job_id: str
    stream: bool
    max_tokens: int
    future: "asyncio.Future[Completion]"
    on_partial: PartialSink | None
    expires: float
    """Monotonic time by which the runtime must have answered (request_timeout_s)."""
    streamed: int = 0
    on_failure: Callable[[RuntimeFailure], None] | None = None
    """Set for a request started by `submit` without a task: called, instead of failing its
    future, when the runtime fails (the supervisor recovers, then fails the future)."""
    on_end: Callable[[bool], None] | None = None
    """Set with `on_failure`: called when the session has set the future (True: a
    completion)."""
    ended: bool = False
    """A submitted request's slot was released (see `Supervisor._submitted_end`)."""


class _Answer(asyncio.Future[Completion]):
    """A `submit`ted request's outcome. Cancelling it aborts the request: the supervisor
    hears of the cancel here, and of the answer from the frame reader, so no done callback
    (a loop turn each) runs per request."""

    __slots__ = ("on_cancel",)

    def __init__(self) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception:  # a bug: the caller's cancel (a task's, gather's) goes on
                log.exception("request_cancel_hook_failed")
        return True


@dataclass(eq=False)
class _Session:
    """One runtime from launch to removal, and the waits on its answers."""

    handle: RuntimeHandle
    spec: LaunchSpec
    ready: "asyncio.Future[Frame]"
    requests: dict[int, _Request] = field(default_factory=dict)
    pings: "dict[int, asyncio.Future[Frame]]" = field(default_factory=dict)
    aborted: dict[int, None] = field(default_factory=dict)
    """Requests aborted by the agent, oldest first (an ordered set)."""
    failure: RuntimeFailure | None = None
    reader: "asyncio.Task[None] | None" = None
    started_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    pinged_at: float = field(default_factory=time.monotonic)
    ping_rtt_ms: float | None = None
    engine_stats: EngineStats | None = None
    """From the last `pong`."""
    request_timeout_s: float = 0.0
    expiry: asyncio.TimerHandle | None = None
    """One timer for all requests' answer deadlines: it is due when the oldest request's
    is (requests are kept in submit order, and all share one timeout)."""
    on_expired: Callable[[], None] | None = None
    draining: "asyncio.Task[None] | None" = None
    """The task waiting for a full input buffer to drain (frames posted without waiting)."""

    def add(self, req: _Request) -> None:
        self.requests[req.request_id] = req
        if self.expiry is None:
            self.expiry = asyncio.get_running_loop().call_at(req.expires, self._check_expiry)

    def _check_expiry(self) -> None:
        self.expiry = None
        oldest = next(iter(self.requests.values()), None)
        if oldest is None or self.failure is not None:
            return
        loop = asyncio.get_running_loop()
        if oldest.expires > loop.time():
            self.expiry = loop.call_at(oldest.expires, self._check_expiry)
            return
        self.fail(
            RuntimeTimeout(
                f"no answer for job {oldest.job_id} within "
                f"request_timeout_s={self.request_timeout_s}s"
            )
        )
        if self.on_expired is not None:
            self.on_expired()

    def is_ready(self) -> bool:
        """The runtime said `ready` and it was accepted (requests may go to it)."""
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def forget_later(self, request_id: int) -> None:
        """Remember an aborted request, so its last frames are ignored; bounded, since a
        request whose `submit` never reached the runtime never sends one."""
        self.aborted[request_id] = None
        while len(self.aborted) > MAX_ABORTED:
            del self.aborted[next(iter(self.aborted))]

    def deliver(self, frame: Frame) -> None:
        """One frame from the runtime. Raises `RuntimeFailure` when the runtime broke the
        protocol: the reader then fails the whole session."""
        self.last_active = time.monotonic()
        kind = frame["t"]
        try:
            if not self.ready.done():
                if kind != FrameKind.READY:
                    raise RuntimeBroken(f"first frame is {kind!r}, expected 'ready'")
                self.ready.set_result(frame)
            elif kind == FrameKind.READY:
                raise RuntimeBroken("second 'ready' frame")
            elif kind == FrameKind.FATAL:
                message = frames.parse_fatal(frame)["message"]
                raise RuntimeEnded(f"runtime reported fatal: {message[:500]}")
            elif kind == FrameKind.PONG:
                future = self.pings.pop(frames.parse_pong(frame)["id"], None)
                if future is None:
                    raise RuntimeBroken(f"'pong' for unknown ping {frame.get('id')!r}")
                if not future.done():
                    future.set_result(frame)
            else:
                self._request_frame(kind, frame)
        except FrameError as exc:
            raise RuntimeBroken(f"bad {kind!r} frame: {exc}") from exc

    def _request_frame(self, kind: str, frame: Frame) -> None:
        request_id = frame.get("id")
        if not isinstance(request_id, int):
            raise RuntimeBroken(f"{kind!r} frame without a request id")
        req = self.requests.get(request_id)
        if req is None:
            if request_id in self.aborted:
                if kind != FrameKind.PARTIAL:
                    self.aborted.pop(request_id, None)  # its last frame: forget it
                return
            raise RuntimeBroken(f"{kind!r} frame for unknown request {request_id}")
        if kind == FrameKind.PARTIAL:
            part = frames.parse_partial(frame)
            if not req.stream:
                raise RuntimeBroken(f"'partial' for request {request_id}, which does not stream")
            req.streamed += len(part["token_ids"])
            if req.streamed > req.max_tokens:
                raise RuntimeBroken(
                    f"request {request_id} streamed {req.streamed} tokens, "
                    f"max_tokens is {req.max_tokens}"
                )
            if req.on_partial is not None:
                try:
                    req.on_partial(Partial(part["token_ids"], part["text"]))
                except Exception:
                    log.exception("partial_sink_failed job_id=%s", req.job_id)
            return
        if kind == FrameKind.DONE:
            outcome = _completion(req, frame)
        else:
            # A bad frame raises with the request still registered: the session's failure
            # is its outcome.
            failed = frames.parse_failed(frame)
            if failed["code"] == FailCode.ABORTED:
                raise RuntimeBroken(f"runtime aborted request {request_id} on its own")
            outcome = _failure(req, failed["code"], failed["reason"])
        del self.requests[request_id]
        if req.future.done():  # its caller was cancelled; the request is being aborted
            return
        if isinstance(outcome, Completion):
            req.future.set_result(outcome)
        else:
            req.future.set_exception(outcome)
        if req.on_end is not None:
            req.on_end(isinstance(outcome, Completion))

    def fail(self, exc: RuntimeFailure) -> None:
        if self.failure is None:
            self.failure = exc
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        waits: list[asyncio.Future[object]] = [self.ready, *self.pings.values()]  # type: ignore[list-item]
        failed = [r for r in self.requests.values() if r.on_failure is not None]
        waits += [r.future for r in self.requests.values() if r.on_failure is None]  # type: ignore[misc]
        for future in waits:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the waiter may be gone; never "never retrieved"
        self.requests.clear()
        self.pings.clear()
        for req in failed:
            assert req.on_failure is not None
            try:
                req.on_failure(exc)
            except Exception as hook_exc:  # a bug: the request fails now, never hangs
                log.exception("request_failure_hook_failed job_id=%s", req.job_id)
                if not req.future.done():
                    req.future.set_exception(RuntimeBroken(f"{exc} ({hook_exc!r})"))
                if req.on_end is not None:
                    req.on_end(False)


def _completion(req: _Request, frame: Frame) -> Completion | NodeError:
    try:
        done = frames.parse_done(frame)
    except FrameError as exc:
        return OutputMalformed(f"job {req.job_id}: {exc}")
    if req.streamed > len(done["token_ids"]):
        return OutputMalformed(
            f"job {req.job_id}: {req.streamed} tokens streamed, {len(done['token_ids'])} in done"
        )
    if len(done["token_ids"]) > req.max_tokens:
        return OutputMalformed(
            f"job {req.job_id}: {len(done['token_ids'])} tokens, max_tokens is {req.max_tokens}"
        )
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


def _failure(req: _Request, code: str, reason: str) -> NodeError:
    message = f"job {req.job_id}: {reason[:1000]}"
    if code == FailCode.BAD_REQUEST:
        return BadRequest(message)
    if code == FailCode.DEADLINE:
        return DeadlineExceeded(message)
    return ItemFailed(f"job {req.job_id}: engine error: {reason[:1000]}")


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
        self._requests = 0
        self._opened_at = 0.0
        self._active = 0
        self._solo_running = False
        self._solo_waiting = 0
        self._admission_changed = asyncio.Event()

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
        # (3) hand back the requests in flight: they end as `RuntimeClosed` (retryable) at
        #     once instead of after their deadline;
        # (4) stop the runtime: `shutdown` frame, up to runtime_stop_timeout_s to exit,
        #     then kill and remove (uncancellable: a cancelled close still removes it).
        if self._watcher is not None:
            self._watcher.cancel()
        if self._session is not None:
            self._session.fail(RuntimeClosed("the supervisor is closing"))
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

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        """Run one request (see `Runtime.generate`)."""
        self._check_open()
        solo = self._suspects.get(item.job_id, 0) >= SOLO_AFTER_STRIKES
        if solo or self._solo_running or self._solo_waiting:
            await self._await_turn(solo)
        self._active += 1
        self._solo_running = solo
        try:
            self._check_open()
            session = self._session
            if session is None or session.failure is not None or not session.is_ready():
                try:
                    session = await self._ready_session()
                except RuntimeFailure as exc:
                    raise _handed_back(item, exc) from exc
            try:
                done = await self._attempt(session, item, on_partial)
            except RuntimeFailure as exc:
                await self._recover(session, exc)
                if isinstance(exc, RuntimeClosed) or not self.is_open:
                    raise _handed_back(item, exc) from exc
                strikes = self._strike(item.job_id)
                if solo:
                    self._suspects.pop(item.job_id, None)
                    log.error(
                        "runtime_poison_job job_id=%s strikes=%d reason=%s",
                        item.job_id,
                        strikes,
                        exc,
                    )
                    raise ItemFailed(
                        f"job {item.job_id} was in flight at {strikes} runtime failures, the last "
                        f"time alone ({type(exc).__name__}: {exc})"
                    ) from exc
                raise _handed_back(item, exc) from exc
        finally:
            self._release(solo)
        self._requests += 1
        self._suspects.pop(item.job_id, None)
        return done

    def submit(
        self, item: WorkItem, on_partial: PartialSink | None = None
    ) -> "asyncio.Future[Completion]":
        """Start one request; the future completes as `generate` returns or raises, and
        cancelling it aborts the request. With the runtime ready and no solo request about,
        no task runs it: the `submit` frame goes out now, the reader completes the future,
        and a runtime failure is recovered from before the future fails. Otherwise
        `generate` runs in a task."""
        self._check_open()
        assert self._tg is not None
        session = self._session
        if (
            session is None
            or session.failure is not None
            or not session.is_ready()
            or self._solo_running
            or self._solo_waiting
            or self._suspects.get(item.job_id, 0) >= SOLO_AFTER_STRIKES
        ):
            return self._generate_in_task(item, on_partial)
        answer = _Answer()
        req = self._request(session, item, on_partial, answer)
        req.on_failure = functools.partial(self._submitted_failed, session, req, item)
        req.on_end = functools.partial(self._submitted_end, req)
        answer.on_cancel = functools.partial(self._submitted_cancelled, session, req)
        self._active += 1
        self._post(session, self._submit_frame(req, item))
        return answer

    def _generate_in_task(
        self, item: WorkItem, on_partial: PartialSink | None
    ) -> "asyncio.Future[Completion]":
        """`generate` in a task of the supervisor's group, its outcome in the returned
        future (an error ends the request, never the group); cancelling it cancels the task."""
        assert self._tg is not None
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                done = await self.generate(item, on_partial)
            except asyncio.CancelledError:
                # Not the caller's cancel (that cancelled the future first): the group is
                # closing, and the request is handed back.
                if not future.done():
                    future.set_exception(RuntimeClosed(f"job {item.job_id}: supervisor closing"))
                raise
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(done)

        task = self._tg.create_task(run())
        future.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return future

    # A submitted request ends when the runtime answers it (`on_end`), its caller cancels
    # it (`on_cancel`) or its runtime fails under it (`on_failure`: recovery, then the
    # future fails), whichever is first; its slot is released once, by `_submitted_end`.

    def _submitted_end(self, req: _Request, completed: bool) -> None:
        if req.ended:
            return
        req.ended = True
        # The hooks refer back to the request: dropped here, so that a finished request is
        # freed at once, not left in a reference cycle for the garbage collector (under
        # CPython's default thresholds that cost a quarter more CPU per request).
        req.on_failure = req.on_end = None
        if isinstance(req.future, _Answer):
            req.future.on_cancel = None
        self._release(False)
        if completed:
            self._requests += 1
            if self._suspects:
                self._suspects.pop(req.job_id, None)

    def _submitted_cancelled(self, session: _Session, req: _Request) -> None:
        """Cancelled (job cancelled, deadline, drain): stop it in the engine."""
        self._submitted_end(req, False)
        self._abort(session, req.request_id)

    def _abort(self, session: _Session, request_id: int) -> None:
        """A request its caller gave up on, if the runtime still runs it: stopped in the
        engine, its last frames ignored."""
        if session.requests.pop(request_id, None) is not None and session.failure is None:
            session.forget_later(request_id)
            if self.is_open:
                self._post(session, frames.abort(request_id))

    def _submitted_failed(
        self, session: _Session, req: _Request, item: WorkItem, exc: RuntimeFailure
    ) -> None:
        """The runtime failed under a request started by `submit`: what `generate` does in
        that case (recover first: the job is handed back once a runtime replaced this
        one), then the future fails."""
        if not self.is_open or self._tg is None:
            self._submitted_end(req, False)
            if not req.future.done():
                req.future.set_exception(_handed_back(item, exc))
            return
        self._tg.create_task(self._recover_then_fail(session, req, item, exc))

    async def _recover_then_fail(
        self, session: _Session, req: _Request, item: WorkItem, exc: RuntimeFailure
    ) -> None:
        # Never raises: an error here would end the supervisor's task group.
        try:
            await self._recover(session, exc)
        except Exception:
            log.exception("runtime_recover_failed job_id=%s", item.job_id)
        finally:
            self._submitted_end(req, False)
            if not req.future.done():
                if self.is_open and not isinstance(exc, RuntimeClosed):
                    self._strike(item.job_id)
                req.future.set_exception(_handed_back(item, exc))

    async def run(self, items: Sequence[WorkItem]) -> list[ItemOutcome]:
        """Each item `submit`ted, concurrently; one outcome per item, in order."""
        futures: list[asyncio.Future[Completion]] = []
        for item in items:
            try:
                futures.append(self.submit(item))
            except NodeError as exc:
                failed: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                futures.append(failed)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, NodeError):
                raise outcome
        return cast(list[ItemOutcome], outcomes)

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

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self.is_open:
            raise RuntimeClosed(f"the supervisor is {self.state.value}")

    async def _await_turn(self, solo: bool) -> None:
        """A solo request waits until nothing else runs, and holds off new requests (with
        no solo request about, `generate` does not call this: nothing to wait for)."""
        if solo:
            self._solo_waiting += 1
        try:
            while self._solo_running or (self._active if solo else self._solo_waiting):
                await self._admission_changed.wait()
        finally:
            if solo:
                self._solo_waiting -= 1
                self._admission_changed_now()

    def _release(self, solo: bool) -> None:
        self._active -= 1
        if solo:
            self._solo_running = False
        if solo or self._solo_waiting:
            self._admission_changed_now()

    def _admission_changed_now(self) -> None:
        self._admission_changed.set()
        self._admission_changed = asyncio.Event()

    def _strike(self, job_id: str) -> int:
        strikes = self._suspects.pop(job_id, 0) + 1
        self._suspects[job_id] = strikes
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)
        return strikes

    async def _attempt(
        self, session: _Session, item: WorkItem, on_partial: PartialSink | None
    ) -> Completion:
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        req = self._request(session, item, on_partial, future)
        request_id = req.request_id
        try:
            self._post(session, self._submit_frame(req, item))
            return await future
        finally:
            self._abort(session, request_id)  # when cancelled (job cancel, deadline, drain)

    def _request(
        self,
        session: _Session,
        item: WorkItem,
        on_partial: PartialSink | None,
        future: "asyncio.Future[Completion]",
    ) -> _Request:
        """A new request on `session`. Its answer deadline is the session's expiry timer
        (which fails the session and so this request): no timer per request."""
        max_tokens = item.payload.get("params", {}).get("max_tokens", DEFAULT_MAX_TOKENS)
        expires = asyncio.get_running_loop().time() + self._settings.request_timeout_s
        req = _Request(
            next(self._ids), item.job_id, item.stream, max_tokens, future, on_partial, expires
        )
        session.add(req)
        return req

    @staticmethod
    def _submit_frame(req: _Request, item: WorkItem) -> frames.SubmitFrame:
        return frames.submit(
            req.request_id,
            item.payload,  # type: ignore[arg-type]
            stream=item.stream,
            deadline=item.deadline,
        )

    def _post(self, session: _Session, frame: object) -> None:
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
            session.fail(
                exc
                if isinstance(exc, RuntimeFailure)
                else RuntimeBroken(f"{kind!r} frame not sent: {exc!r}")
            )
            self._wake.set()
            return
        assert self._tg is not None
        session.draining = self._tg.create_task(self._drain_or_fail(session))

    async def _drain_or_fail(self, session: _Session) -> None:
        timeout_s = self._settings.runtime_write_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await session.handle.drained()
        except TimeoutError:
            session.fail(
                RuntimeTimeout(
                    f"runtime {session.handle.ident[:12]} took no input for "
                    f"runtime_write_timeout_s={timeout_s}s"
                )
            )
            self._wake.set()
        except RuntimeFailure as exc:
            session.fail(exc)
            self._wake.set()
        finally:
            session.draining = None

    async def _ready_session(self) -> _Session:
        session = self._session
        if session is not None and session.failure is None and session.is_ready():
            return session
        async with self._lock:
            self._check_open()
            return await self._ensure_session()

    async def _start(self, spec: LaunchSpec) -> RuntimeFacts:
        """Launch a runtime and wait for its `ready` (caller holds the lock)."""
        assert self._tg is not None
        timeout_s = self._settings.runtime_ready_timeout_s
        handle = await self._backend.launch(spec)
        loop = asyncio.get_running_loop()
        session = _Session(
            handle=handle,
            spec=spec,
            ready=loop.create_future(),
            request_timeout_s=self._settings.request_timeout_s,
            on_expired=self._wake.set,
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
        log.info(
            "runtime_ready runtime=%s engine=%s engine_version=%s device=%s max_active=%d",
            handle.ident[:12],
            facts.engine,
            facts.engine_version,
            facts.device,
            facts.max_active,
        )
        return facts

    async def _read(self, session: _Session) -> None:
        """The session's reader task: frames to waiters until the runtime ends."""
        try:
            await session.handle.pump(session.deliver)
        except RuntimeFailure as exc:
            session.fail(exc)
        except asyncio.CancelledError:
            session.fail(RuntimeClosed("runtime reader stopped"))
            raise
        except Exception as exc:  # a bug; still the runtime must be replaced
            log.exception("runtime_reader_crashed runtime=%s", session.handle.ident[:12])
            session.fail(RuntimeBroken(f"reader crashed: {exc!r}"))
        self._wake.set()

    async def _discard(self, session: _Session, why: str, *, graceful: bool) -> None:
        """Stop and remove one runtime (completes even if cancelled)."""
        if self._session is session:
            self._session = None
        session.fail(RuntimeClosed(why))
        grace_s = self._settings.runtime_stop_timeout_s if graceful else 0.0
        try:
            await session.handle.aclose(grace_s=grace_s)
        finally:
            if session.reader is not None:
                session.reader.cancel()
        log.info("runtime_stopped runtime=%s why=%s", session.handle.ident[:12], why)

    async def _recover(self, session: _Session, exc: RuntimeFailure) -> None:
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
            except RuntimeFailure as start_exc:
                log.error("runtime_restart_failed error=%s", start_exc)

    async def _retire(self, session: _Session, exc: RuntimeFailure) -> None:
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

    async def _ensure_session(self) -> _Session:
        """A session that has not failed (caller holds the lock)."""
        session = self._session
        if session is not None and session.failure is not None:
            await self._retire(session, session.failure)
            session = None
        if session is None:
            self._restarts += 1
            await self._start(self._spec)
            session = self._session
        assert session is not None
        return session

    async def _watch(self) -> None:
        """Restart a runtime that died; ping it every `ping_interval_s`, also while it runs
        requests (a hung engine step answers no ping; each `pong` brings the engine's
        figures, kept for `stats`)."""
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
            except RuntimeFailure as exc:
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
        if now - session.last_active < interval_s and now - session.pinged_at < interval_s:
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
            session.fail(exc)
            await self._recover(session, exc)
        except RuntimeFailure as failure:
            await self._recover(session, failure)
        finally:
            session.pings.pop(ping_id, None)


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
    )


def _handed_back(item: WorkItem, exc: RuntimeFailure) -> RuntimeFailure:
    """A fresh error of the same class for this job. A runtime that cannot start for a
    reason that is final for the node (`IsolationError`) is not the job's fault: its jobs
    get a retryable `RuntimeStartError`."""
    cls: Callable[[str], RuntimeFailure] = type(exc)
    if not exc.retryable:
        cls = RuntimeStartError
    return cls(f"job {item.job_id}: {exc}")


def create_backend(settings: Settings, *, node_id: str) -> Backend:
    """The backend `settings.runtime_backend` names: "docker" (isolated) or "process"
    (local child process, not isolated: development only)."""
    if settings.runtime_backend == "docker":
        from worker.runtime.container import DockerBackend

        return DockerBackend(settings, node_id=node_id)

    log.warning("runtime_backend_not_isolated backend=process")
    return ProcessBackend(settings)
