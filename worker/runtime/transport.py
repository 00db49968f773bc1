"""The seam between the supervisor and whatever runs a runtime (Docker container or local
process): a `Backend` launches runtimes, a `RuntimeHandle` carries frames to and from one.

Backends also share two helpers here: `FrameInbox`, which turns the runtime's stdout bytes
into frames and its stderr bytes into log events, and `call_blocking`, which runs a
blocking call in a thread and, when cancelled, still waits for the call to finish so that
the caller's cleanup sees what the call really did (a container it created, for example).
"""

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from schemas.frames import TO_AGENT, Frame, FrameDecoder, FrameError
from worker.core.errors import RuntimeBroken
from worker.core.resource import finish_uncancellable
from worker.runtime.api import LaunchSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_LOG_LINE = 4096


class RuntimeHandle(Protocol):
    """One started runtime. Frames out with `send`, frames in through `pump`."""

    @property
    def ident(self) -> str:
        """Container id or `pid:<n>`, for logs and stats."""
        ...

    async def send(self, frame: Mapping[str, object]) -> None:
        """Write one frame to the runtime's stdin. Raises `RuntimeEnded` or `RuntimeBroken`."""
        ...

    async def pump(self, deliver: Callable[[Frame], None]) -> None:
        """Read frames until the runtime's output ends, calling `deliver` for each, and
        forward its stderr to the log. Always ends by raising: `RuntimeEnded` when the
        output ends, `RuntimeBroken` on a malformed or oversized frame or stdout noise."""
        ...

    async def exit_status(self) -> str:
        """How the runtime ended (exit code, OOM kill), for the log line that says why."""
        ...

    async def aclose(self, *, grace_s: float) -> None:
        """Ask the runtime to stop (`shutdown` frame), wait up to `grace_s` for it to exit,
        then kill it and remove what it leaves. Safe to call twice, and completes even
        when the calling task is cancelled meanwhile."""
        ...


class Backend(Protocol):
    """Starts runtimes."""

    name: str

    async def remove_leftovers(self) -> int:
        """Remove runtimes a previous agent run of this node left behind; how many."""
        ...

    async def launch(self, spec: LaunchSpec) -> RuntimeHandle:
        """Start one runtime (attached, not yet ready). Leaves nothing behind when it
        raises or is cancelled."""
        ...

    async def aclose(self) -> None: ...


class FrameInbox:
    """Runtime output in, frames and log events out. Pure: no I/O."""

    def __init__(self, ident: str, *, max_frame_bytes: int) -> None:
        self._ident = ident
        self._decoder = FrameDecoder(TO_AGENT, max_frame_bytes=max_frame_bytes)
        self._stderr = bytearray()

    def stdout(self, data: bytes) -> list[Frame]:
        try:
            return self._decoder.feed(data)
        except FrameError as exc:
            raise RuntimeBroken(f"runtime {self._ident} wrote a bad frame: {exc}") from exc

    def stderr(self, data: bytes) -> None:
        self._stderr += data
        while True:
            end = self._stderr.find(b"\n")
            if end < 0:
                if len(self._stderr) > MAX_LOG_LINE:
                    self._log_line(bytes(self._stderr))
                    self._stderr.clear()
                return
            line = bytes(self._stderr[:end])
            del self._stderr[: end + 1]
            self._log_line(line)

    def flush(self) -> None:
        if self._stderr:
            self._log_line(bytes(self._stderr))
            self._stderr.clear()

    def _log_line(self, line: bytes) -> None:
        text = line[:MAX_LOG_LINE].decode("utf-8", "replace").rstrip()
        if text:
            log.info("runtime_log runtime=%s line=%s", self._ident[:12], text)


async def call_blocking(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Run `fn` in a worker thread. A cancellation waits for the thread to finish (its
    result is dropped) and is then re-raised, so a cancelled call never runs on unseen."""
    loop = asyncio.get_running_loop()
    return await finish_uncancellable(
        loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
    )
