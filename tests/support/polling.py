"""The one polling helper: wait until an observable condition holds (`wait_for` in async
code, `wait_until` in sync code such as a subprocess's or a terminal's output)."""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_for(predicate: Predicate, timeout: float = 60.0, interval: float = 0.05) -> None:
    """Return once `predicate()` (sync or async) is true; `TimeoutError` after `timeout` s.

    The predicate must look at something the code under test changes (a stream, a
    container's state, a log file); a wait on the clock alone is not a condition.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate!r}")
        await asyncio.sleep(interval)


def wait_until(probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.2) -> T:
    """The first non-None `probe()`, polled from sync code; `TimeoutError` after `timeout` s.

    `probe` may raise to fail at once (a process that exited, an output that says so).
    """
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {probe!r}")
        time.sleep(interval)
    return found
