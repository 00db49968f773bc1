"""The helpers that build the fake runtime's test image leave nothing open behind them.

CI on a fresh machine (no `rst-test-base` image yet) once errored in the first Docker test
of the supervisor with `Exception ignored in: <_io.FileIO ... mode='rb'>`: building the
base piped mmdebstrap into `docker import` and never closed the pipe's read end."""

import gc
import subprocess

import pytest

from tests.support.fake_runtime_image import pipe


def test_pipe_leaves_no_pipe_open() -> None:
    pipe(["printf", "abc"], ["cat"])
    gc.collect()  # an unclosed pipe would warn here, and warnings are errors


def test_pipe_reports_a_failing_producer() -> None:
    with pytest.raises(RuntimeError, match="false failed"):
        pipe(["false"], ["cat"])
    gc.collect()


def test_pipe_reports_a_failing_consumer_and_reaps_the_producer() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        pipe(["yes"], ["head", "-c", "1", "/nonexistent"])
    gc.collect()
