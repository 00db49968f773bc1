"""The local process backend: not isolated, but it must still leave no process behind.
(The protocol tests in test_supervisor_protocol.py run on it too.)"""

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.settings import MODEL_SHA, make_settings
from tests.support.streaming import Sink, streaming
from worker.core.errors import RuntimeStartError
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.process import ProcessBackend
from worker.runtime.supervisor import Supervisor, create_backend

ROOT = Path(__file__).resolve().parents[2]


def spec(tmp_path: Path, **engine_args: object) -> LaunchSpec:
    return LaunchSpec("echo", "local", tmp_path, MODEL_SHA, dict(engine_args))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_factory_picks_backend() -> None:
    assert create_backend(Settings(runtime_backend="process"), node_id="n").name == "process"
    assert create_backend(Settings(runtime_backend="docker"), node_id="n").name == "docker"


@pytest.mark.parametrize("phase", ["waiting_ready", "mid_request"])
async def test_cancel_leaves_no_process(
    tmp_path: Path, phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(fast_runtime=True, runtime_ready_timeout_s=30.0)
    env = {"PYTHONPATH": str(ROOT)}
    if phase == "waiting_ready":
        env["RESULTITY_ECHO_FAULT"] = "noready"
    backend = ProcessBackend(settings, extra_env=env)
    pids: list[int] = []
    launched = asyncio.Event()
    launch = backend.launch

    async def remembering(s: LaunchSpec) -> object:
        handle = await launch(s)
        pids.append(int(handle.ident[4:]))
        launched.set()
        return handle

    monkeypatch.setattr(backend, "launch", remembering)
    sink = Sink()

    async def body() -> None:
        async with Supervisor(settings, backend, spec(tmp_path, token_delay_ms=20)) as sup:
            await sup.generate(streaming("j"), sink)

    task = asyncio.ensure_future(body())
    await launched.wait()  # launched, not ready: the supervisor waits for `ready`
    if phase == "mid_request":
        await sink.first.wait()  # the request is generating
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pids[0])


async def test_a_runtime_that_floods_its_pipes_before_ready_is_killed_and_reaped(
    tmp_path: Path,
) -> None:
    # Issue 20 item 1, layer 3: the reader gives up at the first oversized frame, so
    # nobody reads the runtime's pipes any more; closing it waited for an exit that the
    # undrained pipes never let it report, and `dev` hung (fails here by the test timeout
    # before the fix).
    settings = make_settings(fast_runtime=True)
    backend = ProcessBackend(
        settings,
        command=[sys.executable, str(ROOT / "tests/support/fake_runtime.py")],
        extra_env={"PYTHONPATH": str(ROOT), "RST_FAKE_MODE": "flood"},
    )
    pids: list[int] = []
    launch = backend.launch

    async def remembering(s: LaunchSpec) -> Any:
        handle = await launch(s)
        pids.append(int(handle.ident[4:]))
        return handle

    backend.launch = remembering  # type: ignore[method-assign]
    with pytest.raises(RuntimeStartError, match="frame"):
        async with Supervisor(settings, backend, spec(tmp_path)):
            pass
    assert pids and not alive(pids[0])


async def test_closing_an_unread_runtime_drains_its_pipes_and_kills_it(tmp_path: Path) -> None:
    # The same at the handle: nothing ever pumps this runtime's output.
    settings = make_settings(fast_runtime=True)
    backend = ProcessBackend(
        settings,
        command=[sys.executable, str(ROOT / "tests/support/fake_runtime.py")],
        extra_env={"PYTHONPATH": str(ROOT), "RST_FAKE_MODE": "flood"},
    )
    handle = await backend.launch(spec(tmp_path))
    pid = int(handle.ident[4:])
    await handle.aclose(grace_s=0.5)
    assert not alive(pid)
    assert await handle.exit_status() == f"exit_code={-signal.SIGKILL}"
