"""Deadlines that all share one timeout, kept by one timer: a FIFO whose head is always due
first, so no timer per entry.

`DeadlineQueue` is the bookkeeping, with the clock passed in (no I/O, no event loop);
`Deadlines` puts one `loop.call_at` timer over it and calls back each entry that expires.
Used for the PubAck waits of stored results (`jobs/publisher.py`) and the run time limits
of the requests on a runtime (`runtime/supervisor.py`).
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


COMPACT_SLACK = 1024
"""Entries that left may stay in the FIFO behind one held long, up to twice the entries
held plus this many; then the FIFO is rebuilt (amortized O(1) per entry added)."""


def _held_at(held: "dict[K, tuple[float, V]]", entry: tuple[float, K]) -> bool:
    found = held.get(entry[1])
    return found is not None and found[0] == entry[0]


class DeadlineQueue(Generic[K, V]):
    """Entries by key, each due `timeout_s` after it was added unless popped first. Keys
    are unique while held; a key added again after it left gets a deadline of its own."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._held: dict[K, tuple[float, V]] = {}
        self._order: deque[tuple[float, K]] = deque()
        """Deadlines in the order they were added (so, of equal timeouts, due order); an
        entry whose key left (or was added again) is skipped when it reaches the head."""

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def add(self, key: K, value: V, now: float) -> float:
        """Hold `value` under `key` until `now + timeout_s`; returns that deadline."""
        order, held = self._order, self._held
        # Drop the entries popped at the head, so that the FIFO stays short (inlined
        # `next_due`: this runs once per stored result).
        while order:
            head = order[0]
            entry = held.get(head[1])
            if entry is not None and entry[0] == head[0]:
                break
            order.popleft()
        if len(order) > 2 * len(held) + COMPACT_SLACK:
            # Mostly entries that left behind one held long: keep those still held.
            order = self._order = deque(e for e in order if _held_at(held, e))
        at = now + self.timeout_s
        held[key] = (at, value)
        order.append((at, key))
        return at

    def pop(self, key: K) -> V | None:
        """Take `key` out before its deadline: its value, or None if it is not held (it
        expired, or was popped already)."""
        entry = self._held.pop(key, None)
        return None if entry is None else entry[1]

    def next_due(self) -> float | None:
        """The deadline of the oldest entry held, or None when none is."""
        order, held = self._order, self._held
        while order:
            at, key = order[0]
            entry = held.get(key)
            if entry is not None and entry[0] == at:
                return at
            order.popleft()
        return None

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Take out every entry due at `now`, oldest first."""
        due: list[tuple[K, V]] = []
        order, held = self._order, self._held
        while order:
            at, key = order[0]
            entry = held.get(key)
            if entry is not None and entry[0] == at:
                if at > now:
                    break
                del held[key]
                due.append((key, entry[1]))
            order.popleft()
        return due


class Deadlines(DeadlineQueue[K, V]):
    """A `DeadlineQueue` on the running loop's clock: `on_expired(key, value)` is called for
    each entry not popped by its deadline, from one timer armed at the oldest one's."""

    def __init__(self, timeout_s: float, on_expired: Callable[[K, V], None]) -> None:
        super().__init__(timeout_s)
        self._on_expired = on_expired
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, key: K, value: V) -> None:
        """`add` now; arms the timer if none is."""
        loop = asyncio.get_running_loop()
        at = self.add(key, value, loop.time())
        if self._timer is None:  # nothing else is held: this one is due first
            self._timer = loop.call_at(at, self._fire)

    def close(self) -> None:
        """Stop the timer; what is held is never called back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        try:
            for key, value in self.expire(loop.time()):
                try:
                    self._on_expired(key, value)
                except Exception:
                    log.exception("deadline_callback_failed")
        finally:
            at = self.next_due()
            if at is not None:
                self._timer = loop.call_at(at, self._fire)
