"""The runtime supervisor: keeps exactly one runtime running, feeds it batches, and
replaces it when it crashes, hangs, or talks nonsense.

A runtime is trusted for nothing: every frame is checked, every wait has a deadline, and a
runtime that breaks any rule is killed and removed before a fresh one starts. A batch
that was in flight comes back as retryable `RuntimeFailure`s. A job that keeps killing
the runtime (it was in a failing batch before) is found by splitting its batch in halves,
each run on a fresh runtime, and only that job fails (`ItemFailed`, final).
"""

import asyncio
import enum
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from schemas import frames
from schemas.frames import PROTOCOL_VERSION, Frame
from worker.core.errors import (
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
from worker.core.resource import finish_uncancellable
from worker.core.settings import Settings
from worker.runtime.api import Completion, ItemOutcome, LaunchSpec, RuntimeFacts, WorkItem
from worker.runtime.process import ProcessBackend
from worker.runtime.transport import Backend, RuntimeHandle

log = logging.getLogger(__name__)

FINISH_REASONS = frozenset({"stop", "length"})
MAX_SUSPECTS = 4096


class SupervisorState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SupervisorStats:
    state: str
    backend: str
    runtime_id: str | None
    restarts: int
    batches: int
    uptime_s: float


@dataclass(eq=False)
class _Session:
    """One runtime from launch to removal, and the waits on its answers."""

    handle: RuntimeHandle
    spec: LaunchSpec
    ready: "asyncio.Future[Frame]"
    pending: "dict[int, asyncio.Future[Frame]]" = field(default_factory=dict)
    pings: "dict[int, asyncio.Future[Frame]]" = field(default_factory=dict)
    abandoned: set[int] = field(default_factory=set)
    failure: RuntimeFailure | None = None
    reader: "asyncio.Task[None] | None" = None
    started_at: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    def deliver(self, frame: Frame) -> None:
        self.last_active = time.monotonic()
        kind = frame["t"]
        if not self.ready.done():
            if kind == "ready":
                self.ready.set_result(frame)
                return
            raise RuntimeBroken(f"first frame is {kind!r}, expected 'ready'")
        if kind == "ready":
            raise RuntimeBroken("second 'ready' frame")
        if kind == "fatal":
            raise RuntimeEnded(f"runtime reported fatal: {str(frame.get('message'))[:500]}")
        ident = frame.get("id")
        waits = self.pending if kind == "result" else self.pings
        future = waits.pop(ident, None) if isinstance(ident, int) else None
        if future is None:
            if kind == "result" and ident in self.abandoned:
                self.abandoned.discard(ident)
                return
            raise RuntimeBroken(f"{kind!r} frame for unknown id {ident!r}")
        if not future.done():
            future.set_result(frame)

    def fail(self, exc: RuntimeFailure) -> None:
        if self.failure is None:
            self.failure = exc
        for future in (self.ready, *self.pending.values(), *self.pings.values()):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # the waiter may be gone; never "never retrieved"
        self.pending.clear()
        self.pings.clear()


class Supervisor:
    """Runs one runtime at a time through `backend`. Use as `async with Supervisor(...)`."""

    def __init__(self, settings: Settings, backend: Backend, spec: LaunchSpec) -> None:
        self._settings = settings
        self._backend = backend
        self._spec = spec
        self._state = SupervisorState.UNOPENED
        self._stack = AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._session: _Session | None = None
        self._facts: RuntimeFacts | None = None
        self._ids = itertools.count(1)
        self._suspects: OrderedDict[str, int] = OrderedDict()
        self._restarts = 0
        self._batches = 0
        self._opened_at = 0.0
        self._closed: asyncio.Future[None] | None = None

    # -- resource --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not SupervisorState.UNOPENED:
            raise RuntimeClosed(f"supervisor is {self._state.value}; it cannot be reopened")
        self._state = SupervisorState.OPEN
        self._opened_at = time.monotonic()
        try:
            self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
            removed = await self._backend.remove_leftovers()
            if removed:
                log.warning("runtime_leftovers_removed count=%d", removed)
            async with self._lock:
                await self._start(self._spec)
            self._watcher = self._tg.create_task(self._watch())
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # Shutdown sequence, each step bounded:
        # (1) state CLOSED: no new batch starts, `run()` raises `RuntimeClosed`;
        # (2) stop the watcher, so no ping or restart races the shutdown;
        # (3) hand back the batch in flight: its items come back as `RuntimeClosed`
        #     (retryable) at once instead of after the batch deadline;
        # (4) stop the runtime: `shutdown` frame, up to runtime_stop_timeout_s to exit,
        #     then kill and remove (shielded: a cancelled close still removes it);
        # (5) close the backend, then the task group (its tasks are all ending by now).
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close())
        await finish_uncancellable(self._closed)

    async def _close(self) -> None:
        self._state = SupervisorState.CLOSED
        if self._watcher is not None:
            self._watcher.cancel()
        if self._session is not None:
            self._session.fail(RuntimeClosed("the supervisor is closing"))
        async with self._lock:  # a run() in flight has now handed its batch back
            session = self._session
            if session is not None:
                await self._discard(session, "supervisor closing", graceful=True)
        try:
            await self._backend.aclose()
        finally:
            await self._stack.aclose()
        log.info("supervisor_closed restarts=%d batches=%d", self._restarts, self._batches)

    # -- public surface --------------------------------------------------------------

    @property
    def state(self) -> SupervisorState:
        return self._state

    @property
    def facts(self) -> RuntimeFacts:
        if self._facts is None:
            raise RuntimeStartError("no runtime has become ready yet")
        return self._facts

    def stats(self) -> SupervisorStats:
        session = self._session
        return SupervisorStats(
            state=self._state.value,
            backend=self._backend.name,
            runtime_id=session.handle.ident if session else None,
            restarts=self._restarts,
            batches=self._batches,
            uptime_s=time.monotonic() - self._opened_at if self._opened_at else 0.0,
        )

    async def run(self, items: Sequence[WorkItem]) -> list[ItemOutcome]:
        """One outcome per item, in order. Concurrent calls are served one at a time."""
        self._check_open()
        if not items:
            return []
        async with self._lock:
            self._check_open()
            return await self._run_isolating(list(items))

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
                self._session.handle.ident[:12] if self._session else None,
                spec.engine,
                spec.image,
            )
            return facts

    # -- runtime lifecycle -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is not SupervisorState.OPEN:
            raise RuntimeClosed(f"supervisor is {self._state.value}")

    async def _start(self, spec: LaunchSpec) -> RuntimeFacts:
        """Launch a runtime and wait for its `ready` frame. Caller holds the lock."""
        assert self._tg is not None
        timeout_s = self._settings.runtime_ready_timeout_s
        handle = await self._backend.launch(spec)
        loop = asyncio.get_running_loop()
        session = _Session(handle=handle, spec=spec, ready=loop.create_future())
        self._session = session
        try:
            if self._state is not SupervisorState.OPEN:
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
            facts = self._check_ready(ready, spec)
        except BaseException as exc:
            await self._discard(session, f"start failed: {exc!r}", graceful=False)
            raise
        self._facts = facts
        log.info(
            "runtime_ready runtime=%s engine=%s engine_version=%s device=%s",
            handle.ident[:12],
            facts.engine,
            facts.engine_version,
            facts.device,
        )
        return facts

    def _check_ready(self, ready: Frame, spec: LaunchSpec) -> RuntimeFacts:
        proto = ready.get("proto")
        if proto != PROTOCOL_VERSION:
            raise RuntimeStartError(
                f"runtime speaks frame protocol {proto!r}, this agent speaks {PROTOCOL_VERSION}: "
                "run a runtime image built for this agent version"
            )
        fields = {}
        for name in ("engine", "engine_version", "model_sha256", "device"):
            value = ready.get(name)
            if not isinstance(value, str):
                raise RuntimeStartError(f"'ready' frame field {name!r} is not a string: {value!r}")
            fields[name] = value
        if spec.model_sha256 and fields["model_sha256"] != spec.model_sha256:
            raise RuntimeStartError(
                f"runtime loaded model {fields['model_sha256']}, expected {spec.model_sha256}"
            )
        return RuntimeFacts(image=spec.image, **fields)

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
        """Replace a runtime that broke a rule. A failed restart is logged; the next batch
        or the watcher tries again."""
        status = await session.handle.exit_status() if isinstance(exc, RuntimeEnded) else ""
        log.warning(
            "runtime_failed runtime=%s error=%s reason=%s %s",
            session.handle.ident[:12],
            type(exc).__name__,
            exc,
            status,
        )
        await self._discard(session, f"{type(exc).__name__}: {exc}", graceful=False)
        if self._state is not SupervisorState.OPEN:
            return
        self._restarts += 1
        try:
            await self._start(self._spec)
        except RuntimeFailure as start_exc:
            log.error("runtime_restart_failed error=%s", start_exc)

    async def _ensure_session(self) -> _Session:
        session = self._session
        if session is not None and session.failure is not None:
            await self._recover(session, session.failure)
            session = self._session
        if session is None:
            self._restarts += 1
            await self._start(self._spec)
            session = self._session
        assert session is not None
        return session

    async def _watch(self) -> None:
        """While idle: restart a runtime that died, ping one that has been quiet."""
        interval_s = self._settings.ping_interval_s
        while self._state is SupervisorState.OPEN:
            try:
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            async with self._lock:
                if self._state is not SupervisorState.OPEN:
                    return
                try:
                    await self._check_idle()
                except RuntimeFailure as exc:
                    log.error("runtime_unavailable error=%s", exc)
                except Exception:
                    log.exception("supervisor_watch_crashed")

    async def _check_idle(self) -> None:
        session = self._session
        if session is None or session.failure is not None:
            await self._ensure_session()
            return
        if time.monotonic() - session.last_active < self._settings.ping_interval_s:
            return
        ping_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        session.pings[ping_id] = future
        timeout_s = self._settings.ping_timeout_s
        try:
            await session.handle.send(frames.ping(ping_id))
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(future)
        except TimeoutError:
            exc: RuntimeFailure = RuntimeTimeout(
                f"no 'pong' within ping_timeout_s={timeout_s}s (hung runtime?)"
            )
            await self._recover(session, exc)
        except RuntimeFailure as exc:
            await self._recover(session, exc)
        finally:
            session.pings.pop(ping_id, None)

    # -- batches ---------------------------------------------------------------------

    async def _run_isolating(self, items: list[WorkItem]) -> list[ItemOutcome]:
        known_suspect = any(item.job_id in self._suspects for item in items)
        try:
            session = await self._ensure_session()
        except RuntimeFailure as exc:
            return _fail_each(items, exc)
        try:
            return await self._attempt(session, items)
        except RuntimeFailure as exc:
            await self._recover(session, exc)
            if isinstance(exc, RuntimeClosed) or self._state is not SupervisorState.OPEN:
                return _fail_each(items, exc)
            self._strike(items)
            if not known_suspect:
                return _fail_each(items, exc)
            log.warning("runtime_poison_search size=%d reason=%s", len(items), type(exc).__name__)
            return await self._bisect(items, exc)

    async def _bisect(self, items: list[WorkItem], exc: RuntimeFailure) -> list[ItemOutcome]:
        """Items that together killed the runtime again: split until the killer is alone."""
        if len(items) == 1:
            item = items[0]
            strikes = self._suspects.pop(item.job_id, 0)
            log.error(
                "runtime_poison_job job_id=%s strikes=%d reason=%s", item.job_id, strikes, exc
            )
            failed = ItemFailed(
                f"job {item.job_id} killed the runtime {strikes} times, the last time alone "
                f"({type(exc).__name__}: {exc})"
            )
            failed.__cause__ = exc
            return [failed]
        mid = len(items) // 2
        outcomes: list[ItemOutcome] = []
        for half in (items[:mid], items[mid:]):
            try:
                session = await self._ensure_session()
            except RuntimeFailure as start_exc:
                outcomes.extend(_fail_each(half, start_exc))
                continue
            try:
                outcomes.extend(await self._attempt(session, half))
            except RuntimeFailure as half_exc:
                await self._recover(session, half_exc)
                if isinstance(half_exc, RuntimeClosed) or self._state is not SupervisorState.OPEN:
                    outcomes.extend(_fail_each(half, half_exc))
                    continue
                self._strike(half)
                outcomes.extend(await self._bisect(half, half_exc))
        return outcomes

    def _strike(self, items: list[WorkItem]) -> None:
        for item in items:
            self._suspects[item.job_id] = self._suspects.pop(item.job_id, 0) + 1
        while len(self._suspects) > MAX_SUSPECTS:
            self._suspects.popitem(last=False)

    async def _attempt(self, session: _Session, items: list[WorkItem]) -> list[ItemOutcome]:
        """Send one batch and map its result. Raises `RuntimeFailure` when the runtime
        broke (the caller replaces it)."""
        batch_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        session.pending[batch_id] = future
        timeout_s = self._settings.batch_timeout_s
        payload = [{**item.payload, "job_id": item.job_id} for item in items]
        answered = False
        try:
            await session.handle.send(frames.batch(batch_id, payload))
            try:
                async with asyncio.timeout(timeout_s):
                    frame = await asyncio.shield(future)
            except TimeoutError as exc:
                raise RuntimeTimeout(
                    f"no result for a batch of {len(items)} within batch_timeout_s={timeout_s}s"
                ) from exc
            answered = True
        finally:
            session.pending.pop(batch_id, None)
            if not answered and session.failure is None:
                session.abandoned.add(batch_id)
        self._batches += 1
        if self._session is session and session.spec is self._spec:
            for item in items:
                self._suspects.pop(item.job_id, None)
        return map_result(items, frame)


def _fail_each(items: Sequence[WorkItem], exc: NodeError) -> list[ItemOutcome]:
    """A fresh error per item, of the same class, caused by `exc`. A runtime that cannot
    start for a reason that is final for the node (`IsolationError`) is not the job's
    fault: its jobs get a retryable `RuntimeStartError`."""
    cls = type(exc)
    if isinstance(exc, RuntimeFailure) and not exc.retryable:
        cls = RuntimeStartError
    outcomes: list[ItemOutcome] = []
    for item in items:
        err = cls(f"job {item.job_id}: {exc}")
        err.__cause__ = exc
        outcomes.append(err)
    return outcomes


def map_result(items: Sequence[WorkItem], frame: Frame) -> list[ItemOutcome]:
    """Map a `result` frame to one outcome per item; anything off is `OutputMalformed`."""
    entries = frame.get("items")
    if not isinstance(entries, list):
        bad = OutputMalformed(f"'result' frame has no item list: {entries!r:.80}")
        return _fail_each(items, bad)
    by_id: dict[str, Any] = {}
    duplicated: set[str] = set()
    for entry in entries:
        job_id = entry.get("job_id") if isinstance(entry, dict) else None
        if not isinstance(job_id, str):
            continue
        if job_id in by_id:
            duplicated.add(job_id)
        by_id[job_id] = entry
    outcomes: list[ItemOutcome] = []
    for item in items:
        if item.job_id in duplicated:
            outcomes.append(OutputMalformed(f"job {item.job_id}: two outcomes in one result"))
            continue
        entry = by_id.get(item.job_id)
        if entry is None:
            outcomes.append(OutputMalformed(f"job {item.job_id}: no outcome in the result"))
            continue
        outcomes.append(map_entry(item.job_id, entry))
    return outcomes


def map_entry(job_id: str, entry: dict[str, Any]) -> ItemOutcome:
    if "error" in entry:
        message = entry["error"]
        if not isinstance(message, str):
            return OutputMalformed(f"job {job_id}: 'error' is not a string")
        return ItemFailed(f"job {job_id}: engine error: {message[:1000]}")
    text = entry.get("text")
    token_ids = entry.get("token_ids")
    finish_reason = entry.get("finish_reason")
    prompt_tokens = entry.get("prompt_tokens")
    problems = []
    if not isinstance(text, str):
        problems.append("'text' is not a string")
    if not isinstance(token_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids
    ):
        problems.append("'token_ids' is not a list of token ids")
    if finish_reason not in FINISH_REASONS:
        problems.append(f"'finish_reason' is {finish_reason!r}")
    if not isinstance(prompt_tokens, int) or isinstance(prompt_tokens, bool) or prompt_tokens < 0:
        problems.append(f"'prompt_tokens' is {prompt_tokens!r}")
    if problems:
        return OutputMalformed(f"job {job_id}: " + "; ".join(problems))
    assert isinstance(text, str) and isinstance(token_ids, list)
    assert isinstance(finish_reason, str) and isinstance(prompt_tokens, int)
    return Completion(
        job_id=job_id,
        text=text,
        token_ids=token_ids,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
    )


def create_backend(settings: Settings, *, node_id: str) -> Backend:
    """The backend `settings.runtime_backend` names: "docker" (isolated) or "process"
    (local child process, not isolated: development only)."""
    if settings.runtime_backend == "docker":
        from worker.runtime.container import DockerBackend

        return DockerBackend(settings, node_id=node_id)

    log.warning("runtime_backend_not_isolated backend=process")
    return ProcessBackend(settings)
