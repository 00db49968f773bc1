"""Runtime stderr into the agent's log: bounded, counted, and escaped."""

import logging
import sys
from pathlib import Path

import pytest

from worker.core.errors import RuntimeEnded
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.process import ProcessBackend
from worker.runtime.stderrlog import RuntimeLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "worker.runtime.stderrlog"]


def test_a_flood_is_rate_limited_and_the_dropped_lines_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    out = RuntimeLog("abc", burst=50, per_second=10, clock=clock)
    out.feed(b"noise\n" * 100_000)
    logged = lines(caplog)
    assert len(logged) == 50
    clock.now += 1.0  # ten lines' worth of budget back
    out.feed(b"after\n")
    logged = lines(caplog)
    assert "runtime_log_dropped runtime=abc lines=99950" in logged
    assert logged[-1] == "runtime_log runtime=abc line=after"


def test_dropped_lines_are_reported_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    out = RuntimeLog("abc", burst=2, per_second=1, clock=Clock())
    out.feed(b"1\n2\n3\n4\n5")
    out.flush()
    assert lines(caplog)[-1] == "runtime_log_dropped runtime=abc lines=3"


def test_a_long_line_without_newline_is_cut_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    out = RuntimeLog("abc", burst=1000, per_second=10, clock=Clock(), max_line=100)
    out.feed(b"x" * 10_000)
    logged = lines(caplog)
    assert all(len(line) < 200 for line in logged)
    assert len(logged) <= 100


def test_control_characters_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    out = RuntimeLog("abc", clock=Clock())
    out.feed(b"red \x1b[31malert\r fake_event=1\x00 \xff\xfe end\n")
    (line,) = lines(caplog)
    assert line == (
        "runtime_log runtime=abc line=red \\x1b[31malert\\r fake_event=1\\x00 \ufffd\ufffd end"
    )
    assert all(ch.isprintable() for ch in line)


async def test_a_runtime_process_flooding_stderr_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flood = "import sys\nfor i in range(20000): sys.stderr.write(f'line {i} \\x1b[2J\\n')"
    backend = ProcessBackend(
        Settings(runtime_backend="process"), command=[sys.executable, "-c", flood]
    )
    handle = await backend.launch(LaunchSpec("echo", "local", tmp_path, "cd" * 32, {}))
    try:
        with pytest.raises(RuntimeEnded):
            await handle.pump(lambda frame: None)
    finally:
        await handle.aclose(grace_s=0)
    messages = [r.getMessage() for r in caplog.records if "runtime_log" in r.getMessage()]
    assert len(messages) < 2000  # of 20,000 lines
    assert "\x1b" not in "".join(messages)
    assert any(m.startswith("runtime_log_dropped ") for m in messages)
