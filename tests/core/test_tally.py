"""`Tally`: a flood of one log event is counted, and written as a line or two."""

import logging

import pytest

from tests.support.polling import wait_for
from worker.core.tally import Tally

log = logging.getLogger("tests.tally")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


async def test_a_flood_is_one_line_and_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    tally = Tally(log, "job_cancel_unheld job_id=%s", "job_cancels_unheld", period_s=3600)
    for i in range(100_000):
        tally.add(f"j-{i}")
    assert lines(caplog) == ["job_cancel_unheld job_id=j-0"]
    tally.close()
    assert lines(caplog)[1:] == ["job_cancels_unheld count=99999 period_s=3600 total=100000"]
    assert tally.total == 100_000


async def test_a_summary_per_period_while_the_flood_lasts_then_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tally = Tally(log, "event n=%s", "events", period_s=0.01)
    for n in range(3):
        tally.add(n)  # the first is logged, two are counted
    assert tally.counting
    await wait_for(lambda: len(lines(caplog)) == 2, timeout=10)
    assert lines(caplog) == ["event n=0", "events count=2 period_s=0.01 total=3"]
    await wait_for(lambda: not tally.counting, timeout=10)  # a period passed with none
    tally.add(3)  # a new spell: logged in full
    tally.close()
    assert lines(caplog)[2:] == ["event n=3"]
    assert tally.total == 4
