"""`Supervisor.submit` (the pipeline's path: no task per request) at the backend seam the
project owns: a scripted runtime handle, so the failure cases are exact.

What the real runtimes show in test_supervisor_protocol.py (cancel aborts, a killed runtime
hands its requests back once replaced) is checked there; here, what no real runtime does on
demand: a recovery whose cleanup raises, and a request whose frame cannot be sent.
"""

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from schemas import frames
from schemas.frames import Frame
from tests.support.polling import wait_for
from tests.support.settings import make_settings
from worker.core.errors import ModelInvalid, RuntimeBroken, RuntimeEnded, RuntimeStartError
from worker.runtime.api import Completion, LaunchSpec, Runtime, WorkItem
from worker.runtime.supervisor import Request, Supervisor


class ScriptedHandle:
    """Says `ready`, answers each `submit` with a `done` (but for the prompt "hold"),
    packs what it is sent as the real handles do; `die()` ends its output."""

    def __init__(self, ident: str, *, close_raises: bool) -> None:
        self.ident = ident
        self.close_raises = close_raises
        self._out: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.sent: list[Mapping[str, object]] = []
        self.closing = False
        self.close_gate: asyncio.Event | None = None
        """When set, removing this runtime waits for it (a recovery under way)."""

    def write(self, frame: Mapping[str, object]) -> bool:
        frames.pack(frame)
        self.sent.append(frame)
        request = frame.get("request")
        if frame["t"] == "submit" and not (
            isinstance(request, dict) and request["prompt"] == "hold"
        ):
            request_id = frame["id"]
            assert isinstance(request_id, int)
            self._out.put_nowait(
                frames.done(
                    request_id,
                    token_ids=[1, 2],
                    text="1 2",
                    finish_reason="length",
                    prompt_tokens=1,
                    first_token_s=0.0,
                )  # type: ignore[arg-type]
            )
        return True

    async def drained(self) -> None:
        return None

    def die(self) -> None:
        self._out.put_nowait(None)

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        deliver(
            frames.ready(  # type: ignore[arg-type]
                engine="scripted", engine_version="1", model_sha256="", device="cpu", max_active=8
            )
        )
        while (frame := await self._out.get()) is not None:
            deliver(frame)
        raise RuntimeEnded(f"runtime {self.ident} output ended")

    async def exit_status(self) -> str:
        return "exit_code=0"

    async def aclose(self, *, grace_s: float) -> None:
        self.closing = True
        if self.close_gate is not None:
            await self.close_gate.wait()
        if self.close_raises:
            self.close_raises = False
            raise RuntimeError("container removal failed (daemon error)")


class ScriptedBackend:
    name = "scripted"

    def __init__(self, *, first_close_raises: bool = False) -> None:
        self.handles: list[ScriptedHandle] = []
        self._first_close_raises = first_close_raises

    async def remove_leftovers(self) -> int:
        return 0

    async def launch(self, spec: LaunchSpec) -> ScriptedHandle:
        handle = ScriptedHandle(
            f"scripted:{len(self.handles)}",
            close_raises=self._first_close_raises and not self.handles,
        )
        self.handles.append(handle)
        return handle

    async def aclose(self) -> None:
        return None


def supervisor(backend: ScriptedBackend) -> Supervisor:
    spec = LaunchSpec("scripted", "local", Path("/nonexistent"), "", {})
    return Supervisor(make_settings(fast_runtime=True), backend, spec)  # type: ignore[arg-type]


def item(job_id: str, prompt: str = "x") -> WorkItem:
    return WorkItem(job_id, {"prompt": prompt, "params": {"max_tokens": 4}})


async def test_submitted_requests_complete_without_a_task_each() -> None:
    backend = ScriptedBackend()
    async with supervisor(backend) as sup:
        tasks_before = len(asyncio.all_tasks())
        answers = [sup.submit(item(f"j{i}")) for i in range(20)]
        assert len(asyncio.all_tasks()) == tasks_before
        done = await asyncio.gather(*answers)
        assert [d.job_id for d in done] == [f"j{i}" for i in range(20)]
        assert sup.stats().active == 0 and sup.stats().requests == 20


async def test_a_recovery_that_raises_hands_the_job_back_and_the_supervisor_stays() -> None:
    """The runtime dies, and removing it fails with an error that is not a runtime
    failure: the job is still handed back (retryable), and the supervisor goes on."""
    backend = ScriptedBackend(first_close_raises=True)
    async with supervisor(backend) as sup:
        answer = sup.submit(item("victim", prompt="hold"))
        backend.handles[0].die()
        with pytest.raises(RuntimeEnded) as failed:
            await answer
        assert failed.value.retryable and "job victim" in str(failed.value)
        assert sup.is_open and sup.stats().active == 0
        later: Completion = await sup.submit(item("later"))
        assert later.job_id == "later" and len(backend.handles) == 2


async def test_a_frame_that_cannot_be_sent_fails_the_runtime_not_the_agent() -> None:
    backend = ScriptedBackend()
    async with supervisor(backend) as sup:
        bad = WorkItem("unpackable", {"prompt": object(), "params": {}})
        answer = sup.submit(bad)
        with pytest.raises(RuntimeBroken) as failed:
            await answer
        assert failed.value.retryable and "not sent" in str(failed.value)
        assert sup.is_open
        assert (await sup.submit(item("after"))).job_id == "after"


async def test_cancelling_a_submitted_request_posts_its_abort() -> None:
    backend = ScriptedBackend()
    async with supervisor(backend) as sup:
        handle = backend.handles[0]
        answer = sup.submit(item("gone", prompt="hold"))
        answer.cancel()
        await wait_for(lambda: len(handle.sent) == 2, timeout=10)
        assert [f["t"] for f in handle.sent] == ["submit", "abort"]
        assert handle.sent[1]["id"] == handle.sent[0]["id"]
        assert sup.stats().active == 0 and sup.stats().aborting == 1


async def test_a_request_ends_once_whichever_way_comes_first() -> None:
    """Answered, cancelled, or failed with its runtime: the slot is released once, also
    when the caller cancels while the runtime under the request is being replaced."""
    backend = ScriptedBackend()
    async with supervisor(backend) as sup:
        answered = sup.submit(item("answered"))
        assert sup.stats().active == 1
        assert (await answered).job_id == "answered"
        assert not answered.cancel()  # too late: nothing happens
        assert sup.stats().active == 0 and sup.stats().requests == 1

        gate = asyncio.Event()
        backend.handles[0].close_gate = gate
        victim = sup.submit(item("victim", prompt="hold"))
        backend.handles[0].die()
        await wait_for(lambda: backend.handles[0].closing, timeout=10)  # recovery under way
        assert sup.stats().active == 1
        assert victim.cancel()
        assert sup.stats().active == 0
        gate.set()
        later = await sup.submit(item("later"))
        assert later.job_id == "later" and len(backend.handles) == 2
        assert sup.stats().active == 0 and sup.stats().requests == 2
        assert [f["t"] for f in backend.handles[0].sent] == ["submit", "submit"]  # no abort


async def test_a_cancel_that_fails_in_the_supervisor_is_logged_and_the_cancel_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def _cancelled(self, req: Request) -> None:
            raise RuntimeError("bug in the abort path")

    loop = asyncio.get_running_loop()
    answer = Request(Broken(), 1, item("j"), None, solo=False, loop=loop)  # type: ignore[arg-type]
    assert answer.cancel()  # a task's or gather's cancel is not broken by the supervisor
    assert answer.cancelled()
    assert "request_cancel_failed" in caplog.text


async def test_after_a_restart_requests_wait_for_the_gate_check() -> None:
    """The gate (the model's vectors, in the agent): a restarted runtime takes requests
    only once its check passed; the check's own requests skip the gate."""
    backend = ScriptedBackend()
    checks: list[str] = []

    async def check(runtime: Runtime) -> None:
        checks.append((await runtime.generate(item("vector", prompt="v"))).job_id)

    async with supervisor(backend) as sup:
        sup.gate(check)
        assert (await sup.submit(item("before"))).job_id == "before" and checks == []
        backend.handles[0].die()
        await wait_for(lambda: sup.restarts == 1, timeout=10)
        assert (await sup.submit(item("after", prompt="a"))).job_id == "after"
        assert checks == ["vector"]
        submitted = [f["request"] for f in backend.handles[1].sent if f["t"] == "submit"]
        assert [r["prompt"] for r in submitted] == ["v", "a"]  # type: ignore[index]
        assert (await sup.submit(item("again"))).job_id == "again" and checks == ["vector"]


async def test_a_runtime_that_fails_the_gate_hands_the_waiting_requests_back() -> None:
    backend = ScriptedBackend()
    invalid: list[ModelInvalid] = []

    async def check(runtime: Runtime) -> None:
        raise ModelInvalid("vector 0 differs")

    async with supervisor(backend) as sup:
        sup.gate(check, invalid.append)
        backend.handles[0].die()
        await wait_for(lambda: sup.restarts == 1, timeout=10)
        with pytest.raises(RuntimeStartError, match="not validated: vector 0 differs") as failed:
            await sup.submit(item("waiting"))
        assert failed.value.retryable and [str(e) for e in invalid] == ["vector 0 differs"]
        sup.gate(None)
        assert (await sup.submit(item("ungated"))).job_id == "ungated"


async def test_a_gate_replaced_while_its_check_runs_has_no_say() -> None:
    """A check's verdict is about the gate it ran for. Once that gate was replaced (the
    agent swaps gates when it switches models), an old check's `ModelInvalid` reached the
    old gate's `on_invalid` (in the agent, the one queue of troubles: the model loaded now
    was taken out of service for the old model's vectors)."""
    backend = ScriptedBackend()
    started, release, ended = asyncio.Event(), asyncio.Event(), asyncio.Event()
    old_invalid: list[ModelInvalid] = []
    new_invalid: list[ModelInvalid] = []

    async def old_check(runtime: Runtime) -> None:
        started.set()
        try:
            await release.wait()
        finally:
            ended.set()  # in the step that raises into the gate's task
        raise ModelInvalid("the old model's vector 0 differs")

    async def new_check(runtime: Runtime) -> None:
        return None

    async with supervisor(backend) as sup:
        sup.gate(old_check, old_invalid.append)
        backend.handles[0].die()
        await wait_for(lambda: sup.restarts == 1, timeout=10)
        waiting = sup.submit(item("waiting"))
        await started.wait()
        sup.gate(new_check, new_invalid.append)
        assert (await waiting).job_id == "waiting"
        release.set()
        await ended.wait()
        assert old_invalid == [] and new_invalid == []
        assert (await sup.submit(item("after"))).job_id == "after"


async def test_an_on_invalid_callback_that_raises_is_logged_and_the_requests_are_handed_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`on_invalid` raising escaped the gate's task: the waiting requests were never
    answered (they hung) and the supervisor's task group failed."""
    backend = ScriptedBackend()

    async def check(runtime: Runtime) -> None:
        raise ModelInvalid("vector 0 differs")

    def on_invalid(exc: ModelInvalid) -> None:
        raise RuntimeError("the agent's callback broke")

    async with supervisor(backend) as sup:
        sup.gate(check, on_invalid)
        backend.handles[0].die()
        await wait_for(lambda: sup.restarts == 1, timeout=10)
        with pytest.raises(RuntimeStartError, match="not validated: vector 0 differs"):
            await asyncio.wait_for(sup.submit(item("waiting")), 10)
        sup.gate(None)
        assert (await sup.submit(item("ungated"))).job_id == "ungated"
    assert "runtime_gate_on_invalid_failed" in caplog.text


async def test_a_runtime_started_by_replace_waits_for_the_gate_check_too() -> None:
    """The gate is promised for every runtime started after it was set; it counted restarts
    only, so a runtime from `replace` (a new configuration) took gated requests unchecked."""
    backend = ScriptedBackend()
    checks: list[str] = []

    async def check(runtime: Runtime) -> None:
        checks.append((await runtime.generate(item("vector", prompt="v"))).job_id)

    async with supervisor(backend) as sup:
        sup.gate(check)
        await sup.replace(LaunchSpec("scripted", "local", Path("/other"), "", {}))
        assert (await sup.submit(item("after", prompt="a"))).job_id == "after"
        assert checks == ["vector"] and sup.restarts == 0
        submitted = [f["request"] for f in backend.handles[1].sent if f["t"] == "submit"]
        assert [r["prompt"] for r in submitted] == ["v", "a"]  # type: ignore[index]
