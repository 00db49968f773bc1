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
from contextlib import AsyncExitStack

from schemas import frames
from schemas.frames import Frame
from worker.core.errors import RuntimeEnded, RuntimeStartError
from worker.core.resource import AsyncResource, finish_uncancellable
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.launch import launch_env
from worker.runtime.stderrlog import RuntimeLog
from worker.runtime.transport import FrameInbox, FrameWriter

log = logging.getLogger(__name__)

DEFAULT_COMMAND = (sys.executable, "-m", "containers.runtime")
READ_CHUNK = 1 << 16
INHERITED_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV")
REAP_TIMEOUT_S = 5.0
"""After the kill: how long the process may take to exit and close its pipes."""


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
        handle = ProcessHandle(self._command, env, self._settings)
        # Opened here and handed over open: the caller's `aclose` ends it. A failed or
        # cancelled start has already closed it (`AsyncResource.__aenter__`).
        await handle.__aenter__()
        return handle

    async def aclose(self) -> None:
        return None


class ProcessHandle(AsyncResource):
    """One runtime child process: started by entering it, killed and reaped by `aclose`."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], settings: Settings) -> None:
        super().__init__()
        self._command = tuple(command)
        self._env = dict(env)
        self._settings = settings
        self._grace_s = settings.runtime_stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._ident = "pid:?"
        self._inbox: FrameInbox | None = None
        self._stderr = RuntimeLog(self._ident)
        self._out: FrameWriter | None = None
        # Whoever reads a pipe holds its lock: `pump` while it runs, `_close`'s drains after.
        self._stdout_lock = asyncio.Lock()
        self._stderr_lock = asyncio.Lock()

    @property
    def ident(self) -> str:
        return self._ident

    async def _open(self, stack: AsyncExitStack) -> None:
        starting = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                start_new_session=True,
                limit=READ_CHUNK,
            )
        )
        try:
            proc = await finish_uncancellable(starting)
        except asyncio.CancelledError:
            if not starting.cancelled() and starting.exception() is None:
                self._adopt(starting.result())  # started after all: `_close` kills it
            raise
        except OSError as exc:
            raise RuntimeStartError(f"could not start {self._command[0]}: {exc}") from exc
        self._adopt(proc)
        log.warning("runtime_process_started pid=%d isolated=false", proc.pid)

    def _adopt(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._ident = f"pid:{proc.pid}"
        self._inbox = FrameInbox(
            self._ident, max_frame_bytes=self._settings.runtime_max_frame_bytes
        )
        self._stderr = RuntimeLog(self._ident)
        if proc.stdin is not None:
            self._out = FrameWriter(proc.stdin, self._ident)

    def write(self, frame: Mapping[str, object]) -> bool:
        if self._out is None or self._proc is None:
            raise RuntimeEnded(f"runtime {self._ident} is closed")
        return self._out.write(frame)

    async def drained(self) -> None:
        if self._out is not None:
            await self._out.drained()

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        proc, inbox = self._proc, self._inbox
        assert proc is not None and inbox is not None
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None and stderr is not None
        try:
            async with self._stdout_lock, asyncio.TaskGroup() as tg:
                tg.create_task(self._forward(stderr))
                while data := await stdout.read(READ_CHUNK):
                    for frame in inbox.stdout(data):
                        deliver(frame)
                raise RuntimeEnded(f"runtime {self._ident} output ended")
        except BaseExceptionGroup as group:
            # The stderr forwarder never raises: the group holds the stdout error alone.
            raise group.exceptions[0] from None
        finally:
            self._stderr.flush()

    async def _forward(self, stderr: asyncio.StreamReader) -> None:
        async with self._stderr_lock:
            while data := await stderr.read(READ_CHUNK):
                self._stderr.feed(data)

    async def exit_status(self) -> str:
        return f"exit_code={self._proc.returncode if self._proc else None}"

    async def aclose(self, *, grace_s: float | None = None) -> None:
        """Close with `grace_s` (default `runtime_stop_timeout_s`) for a clean exit; the
        first caller's grace applies."""
        if grace_s is not None and self._closing is None:
            self._grace_s = grace_s
        await super().aclose()

    async def _close(self) -> None:
        # Shutdown sequence: (1) drain its stdout and stderr from here on, whoever stopped
        # reading them (an exiting process must be able to flush, and asyncio reports the
        # exit only once both pipes reached their end); (2) `shutdown` frame and up to the
        # grace for the process to exit; (3) SIGKILL its whole process group (an engine
        # may have children) and close its stdin; (4) reap it, within REAP_TIMEOUT_S.
        proc = self._proc
        if proc is None:
            return
        async with asyncio.TaskGroup() as tg:
            drains = [
                tg.create_task(_drain(proc.stdout, self._stdout_lock)),
                tg.create_task(_drain(proc.stderr, self._stderr_lock)),
            ]
            if proc.returncode is None and self._grace_s > 0:
                try:
                    async with asyncio.timeout(self._grace_s):
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
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.transport.abort()  # unsent input is dropped, not waited for
            try:
                async with asyncio.timeout(REAP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                # Something outside its process group holds its pipes open.
                log.error("runtime_process_not_reaped pid=%d", proc.pid)
            for drain in drains:
                drain.cancel()
        log.info("runtime_process_stopped pid=%d exit_code=%s", proc.pid, proc.returncode)


async def _drain(stream: asyncio.StreamReader | None, lock: asyncio.Lock) -> None:
    """Read `stream` to its end and drop what it says, once its reader let go of it."""
    if stream is None:
        return
    async with lock:
        while await stream.read(READ_CHUNK):
            pass
