"""The one polling helper: wait until an observable condition holds."""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

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
