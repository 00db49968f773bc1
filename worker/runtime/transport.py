"""The seam between the supervisor and whatever runs a runtime (Docker container or local
process): a `Backend` launches runtimes, a `RuntimeHandle` carries frames to and from one.

Backends also share helpers here: `FrameWriter`, which queues frames for the runtime's
stdin and writes those of one event-loop turn at once, `FrameInbox`, which turns the
runtime's stdout bytes into frames, and
`call_blocking`, which runs a blocking call in a thread and, when cancelled, still waits
for the call to finish so that the caller's cleanup sees what the call really did (a
container it created, for example).
"""

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from schemas.codec import packer
from schemas.frames import TO_AGENT, Frame, FrameDecoder, FrameError
from worker.core.errors import RuntimeBroken, RuntimeEnded
from worker.core.resource import finish_uncancellable
from worker.runtime.api import LaunchSpec

T = TypeVar("T")


class RuntimeHandle(Protocol):
    """One started runtime. Frames out with `write` (and `drained`), frames in through `pump`."""

    @property
    def ident(self) -> str:
        """Container id or `pid:<n>`, for logs and stats."""
        ...

    def write(self, frame: Mapping[str, object]) -> bool:
        """Queue one frame for the runtime's stdin; see `FrameWriter.write`. Raises
        `RuntimeEnded` when the runtime's input is closed."""
        ...

    async def drained(self) -> None:
        """Wait until what was queued is written down to the buffer's limit; see
        `FrameWriter.drained`. Raises `RuntimeEnded`."""
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


class FrameWriter:
    """Frames out to a runtime's stdin, without a task or a wait per frame.

    `write` queues a frame; the frames queued in one turn of the event loop go out in one
    write at its end (a write through Docker's attach proxy costs about as much as a small
    job, and under load many jobs are submitted in the same turn). It returns False once
    the output buffer is over its limit: the caller then waits on `drained`, under its own
    deadline, so a runtime that stops reading its input cannot grow the buffer for ever.
    """

    def __init__(self, writer: asyncio.StreamWriter, ident: str) -> None:
        self._writer = writer
        self._ident = ident
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._limit = writer.transport.get_write_buffer_limits()[1]
        self._pack = packer()  # used on the event loop's thread only

    def write(self, frame: Mapping[str, object]) -> bool:
        if self._writer.is_closing():
            raise RuntimeEnded(f"runtime {self._ident[:12]} input is closed")
        data = self._pack(frame)
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._write_queued)
        self._queued.append(data)
        self._queued_bytes += len(data)
        return self._queued_bytes + self._writer.transport.get_write_buffer_size() <= self._limit

    def _write_queued(self) -> None:
        data = b"".join(self._queued)
        self._queued.clear()
        self._queued_bytes = 0
        if data and not self._writer.is_closing():
            # A failed write closes the transport; the next `drained` raises, and the
            # reader sees the runtime's output end.
            self._writer.write(data)

    async def drained(self) -> None:
        self._write_queued()
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise RuntimeEnded(f"runtime {self._ident[:12]} input is gone: {exc}") from exc


class FrameInbox:
    """A runtime's stdout bytes in, frames out (its stderr goes through
    `worker.runtime.stderrlog`, bounded and rate-limited). Pure: no I/O."""

    def __init__(self, ident: str, *, max_frame_bytes: int) -> None:
        self._ident = ident
        self._decoder = FrameDecoder(TO_AGENT, max_frame_bytes=max_frame_bytes)

    def stdout(self, data: bytes) -> list[Frame]:
        try:
            return self._decoder.feed(data)
        except FrameError as exc:
            raise RuntimeBroken(f"runtime {self._ident} wrote a bad frame: {exc}") from exc


async def call_blocking(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Run `fn` in a worker thread. A cancellation waits for the thread to finish (its
    result is dropped) and is then re-raised, so a cancelled call never runs on unseen."""
    loop = asyncio.get_running_loop()
    return await finish_uncancellable(
        loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
    )
