"""`DeadlineQueue` without a loop (the clock passed in), and `Deadlines`, its one timer on
the running loop: only what is due expires, each entry once."""

import asyncio

import pytest

from worker.core.deadlines import DeadlineQueue, Deadlines


def test_only_what_is_due_expires_oldest_first() -> None:
    queue: DeadlineQueue[str, int] = DeadlineQueue(10.0)
    for now, key in enumerate("abc"):
        assert queue.add(key, now, float(now)) == now + 10.0
    assert queue.pop("b") == 1 and queue.pop("b") is None
    assert queue.next_due() == 10.0
    assert queue.expire(9.9) == []
    assert queue.expire(10.5) == [("a", 0)]
    assert queue.next_due() == 12.0  # "b" left: "c" is next
    assert "c" in queue and len(queue) == 1
    assert queue.expire(100.0) == [("c", 2)]
    assert queue.next_due() is None and len(queue) == 0 and queue.pop("a") is None


def test_a_key_added_again_keeps_its_own_deadline() -> None:
    queue: DeadlineQueue[str, str] = DeadlineQueue(10.0)
    queue.add("k", "first", 0.0)
    queue.pop("k")
    queue.add("k", "second", 5.0)
    assert queue.expire(10.0) == []  # the first deadline left with the first entry
    assert queue.expire(15.0) == [("k", "second")]


def test_answered_entries_do_not_pile_up() -> None:
    """Entries popped soon after they were added (PubAcks landing) leave the FIFO as the
    next one is added, not when the timer fires."""
    queue: DeadlineQueue[int, None] = DeadlineQueue(10.0)
    for key in range(1000):
        queue.add(key, None, 1.0)
        queue.pop(key)
    assert len(queue) == 0 and len(queue._order) <= 1
    assert queue.expire(100.0) == []


def test_entries_answered_behind_a_long_one_do_not_pile_up() -> None:
    """One entry held long (a runtime request generating for minutes) kept every entry
    added after it in the FIFO until it left: the runtime's short requests piled up there
    for up to their timeout. The FIFO is compacted once it is mostly entries that left."""
    queue: DeadlineQueue[int, None] = DeadlineQueue(300.0)
    queue.add(-1, None, 0.0)
    for key in range(20_000):
        queue.add(key, None, key / 1000)
        queue.pop(key)
    assert len(queue) == 1 and len(queue._order) <= 2 * len(queue) + 1024
    assert queue.next_due() == 300.0
    assert queue.expire(300.0) == [(-1, None)] and queue.next_due() is None


async def test_deadlines_call_back_only_what_is_due() -> None:
    told: dict[str, object] = {}
    expired = asyncio.Event()

    def on_expired(key: int, name: str) -> None:
        assert name not in told, "told twice"
        told[name] = key
        expired.set()

    deadlines: Deadlines[int, str] = Deadlines(0.2, on_expired)
    deadlines.watch(1, "answered")
    deadlines.watch(2, "silent")
    assert deadlines.pop(1) == "answered"  # its answer came
    await asyncio.wait_for(expired.wait(), 10)
    assert told == {"silent": 2}
    assert len(deadlines) == 0


async def test_a_failing_callback_is_logged_and_the_rest_still_expire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    told: list[int] = []
    done = asyncio.Event()

    def on_expired(key: int, value: None) -> None:
        if key == 1:
            raise RuntimeError("bug in the caller")
        told.append(key)
        done.set()

    deadlines: Deadlines[int, None] = Deadlines(0.0, on_expired)
    deadlines.watch(1, None)
    deadlines.watch(2, None)
    await asyncio.wait_for(done.wait(), 10)
    assert told == [2]
    assert "deadline_callback_failed" in caplog.text


async def test_a_closed_timer_calls_nothing_back() -> None:
    told: list[int] = []
    deadlines: Deadlines[int, None] = Deadlines(0.0, lambda key, value: told.append(key))
    loop = asyncio.get_running_loop()
    deadlines.watch(1, None)
    deadlines.close()
    after: asyncio.Future[None] = loop.create_future()
    loop.call_at(loop.time() + 0.001, after.set_result, None)  # due after the closed timer
    await after
    assert told == [] and len(deadlines) == 1
