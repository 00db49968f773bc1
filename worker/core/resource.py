"""One model for every long-lived thing: entered once, closed once, closed means closed.

`AsyncResource` subclasses put their start in `_open` (children entered through the given
`AsyncExitStack`, never by calling `__aenter__` by hand) and their own shutdown sequence in
`_close`; the stack then unwinds the children in reverse order. `aclose()` may be called any
number of times, from any task; the first call runs the close to its end even if its caller
is cancelled meanwhile (the cancellation is re-raised after), later calls wait for it.
"""

import asyncio
import enum
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self, TypeVar

from worker.core.errors import ResourceClosed

T = TypeVar("T")


class ResourceState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


async def finish_uncancellable(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` to the end even if the caller is cancelled meanwhile, then
    re-raise the cancellation. For cleanup and calls that must not be cut short."""
    future = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation wins
        raise cancelled
    return future.result()


class AsyncResource:
    """Base of the agent's long-lived components (see the module docstring)."""

    def __init__(self) -> None:
        self._state = ResourceState.NEW
        self._stack = AsyncExitStack()
        self._closing: asyncio.Future[None] | None = None

    @property
    def state(self) -> ResourceState:
        return self._state

    @property
    def is_open(self) -> bool:
        return self._state is ResourceState.OPEN

    def check_open(self) -> None:
        """Raise `ResourceClosed` unless the resource is open."""
        if self._state is not ResourceState.OPEN:
            raise ResourceClosed(f"{type(self).__name__} is {self._state.value}")

    async def __aenter__(self) -> Self:
        if self._state is not ResourceState.NEW:
            raise ResourceClosed(
                f"{type(self).__name__} is {self._state.value}; it cannot be reopened"
            )
        self._state = ResourceState.OPEN
        try:
            await self._open(self._stack)
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
        if self._closing is None:
            if self._state is ResourceState.NEW:
                self._state = ResourceState.CLOSED
                return
            self._state = ResourceState.CLOSING
            self._closing = asyncio.ensure_future(self._close_all())
        await finish_uncancellable(self._closing)

    async def _close_all(self) -> None:
        try:
            await self._close()
        finally:
            try:
                await self._stack.aclose()
            finally:
                self._state = ResourceState.CLOSED

    async def _open(self, stack: AsyncExitStack) -> None:
        """Start: enter children with `stack.enter_async_context`. Override."""

    async def _close(self) -> None:
        """The subclass's own shutdown sequence, before its children unwind. Override."""
