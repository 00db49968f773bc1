"""The local process backend: `python -m containers.runtime` as a child process, the same
frames over its stdin/stdout pipes.

NOT ISOLATED. The runtime runs as the agent's user, on the agent's network, and can read
everything the agent can, the node key included. It exists for development on machines
without Docker; never use it on a node that serves the network (`runtime_backend=docker`).
"""

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from schemas import frames
from schemas.frames import Frame
from worker.core.errors import RuntimeEnded, RuntimeStartError
from worker.core.resource import finish_uncancellable
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.launch import launch_env
from worker.runtime.stderrlog import RuntimeLog
from worker.runtime.transport import FrameInbox, FrameWriter

log = logging.getLogger(__name__)

DEFAULT_COMMAND = (sys.executable, "-m", "containers.runtime")
READ_CHUNK = 1 << 16
INHERITED_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV")


class ProcessBackend:
    """Launches runtimes as local child processes (not isolated, see the module doc)."""

    name = "process"

    def __init__(
        self,
        settings: Settings,
        *,
        command: Sequence[str] = DEFAULT_COMMAND,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._command = tuple(command)
        self._extra_env = dict(extra_env or {})

    async def remove_leftovers(self) -> int:
        return 0  # children die with the agent's process group

    async def launch(self, spec: LaunchSpec) -> "ProcessHandle":
        # Only what the runtime needs: the agent's own RESULTITY_* settings stay out.
        env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV}
        env |= launch_env(spec, self._settings, model_dir=str(spec.model_dir))
        env |= self._extra_env
        env["HOME"] = os.environ.get("HOME", "/tmp")
        starting = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=READ_CHUNK,
            )
        )
        try:
            proc = await finish_uncancellable(starting)
        except asyncio.CancelledError:
            if not starting.cancelled() and starting.exception() is None:
                await ProcessHandle(starting.result(), self._settings).aclose(grace_s=0)
            raise
        except OSError as exc:
            raise RuntimeStartError(f"could not start {self._command[0]}: {exc}") from exc
        handle = ProcessHandle(proc, self._settings)
        log.warning("runtime_process_started pid=%d isolated=false", proc.pid)
        return handle

    async def aclose(self) -> None:
        return None


class ProcessHandle:
    """One runtime child process."""

    def __init__(self, proc: asyncio.subprocess.Process, settings: Settings) -> None:
        self._proc = proc
        self._ident = f"pid:{proc.pid}"
        self._inbox = FrameInbox(self._ident, max_frame_bytes=settings.runtime_max_frame_bytes)
        self._stderr = RuntimeLog(self._ident)
        self._closing: asyncio.Future[None] | None = None
        self._out = FrameWriter(proc.stdin, self._ident) if proc.stdin is not None else None

    @property
    def ident(self) -> str:
        return self._ident

    def write(self, frame: Mapping[str, object]) -> bool:
        if self._out is None:
            raise RuntimeEnded(f"runtime {self._ident} is closed")
        return self._out.write(frame)

    async def drained(self) -> None:
        if self._out is not None:
            await self._out.drained()

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        stdout, stderr = self._proc.stdout, self._proc.stderr
        assert stdout is not None and stderr is not None
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._forward(stderr))
                while data := await stdout.read(READ_CHUNK):
                    for frame in self._inbox.stdout(data):
                        deliver(frame)
                raise RuntimeEnded(f"runtime {self._ident} output ended")
        except BaseExceptionGroup as group:
            # The stderr forwarder never raises: the group holds the stdout error alone.
            raise group.exceptions[0] from None
        finally:
            self._stderr.flush()

    async def _forward(self, stderr: asyncio.StreamReader) -> None:
        while data := await stderr.read(READ_CHUNK):
            self._stderr.feed(data)

    async def exit_status(self) -> str:
        return f"exit_code={self._proc.returncode}"

    async def aclose(self, *, grace_s: float) -> None:
        # Shutdown sequence: (1) `shutdown` frame; (2) up to `grace_s` for the process to
        # exit; (3) SIGKILL its whole process group (an engine may have children);
        # (4) reap it. Runs to the end even if the caller is cancelled.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(grace_s))
        await finish_uncancellable(self._closing)

    async def _close(self, grace_s: float) -> None:
        proc = self._proc
        if proc.returncode is None and grace_s > 0:
            try:
                async with asyncio.timeout(grace_s):
                    if not self.write(frames.shutdown()):
                        await self.drained()
                    await proc.wait()
            except (TimeoutError, RuntimeEnded):
                pass
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        log.info("runtime_process_stopped pid=%d exit_code=%s", proc.pid, proc.returncode)
