"""The serving process's collector settings: applied by `resultity-node run` once the agent
is open, before it serves; cycles are still collected afterwards."""

import asyncio
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import worker.node.agent as agent_module
from tests.support.settings import make_settings
from worker.core.signing import NodeKey


def test_tune_for_serving_freezes_the_start_heap_and_raises_the_young_threshold() -> None:
    # In a process of its own: what is frozen stays frozen for the process's life.
    script = textwrap.dedent(
        """
        import gc, weakref
        from worker.core.gcpolicy import tune_for_serving, YOUNG_THRESHOLD
        assert gc.get_freeze_count() == 0
        tune_for_serving()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD, gc.get_threshold()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made while serving
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None, "a cycle made after tuning was not collected"
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_run_tunes_the_collector_once_the_agent_is_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    steps: list[str] = []

    class FakeAgent:
        force = asyncio.Event()

        def __init__(self, *args: object) -> None:
            pass

        async def __aenter__(self) -> "FakeAgent":
            steps.append("open")
            return self

        async def __aexit__(self, *exc: object) -> None:
            steps.append("close")

        async def serve(self, stop: asyncio.Event) -> None:
            steps.append("serve")

    monkeypatch.setattr(agent_module, "Agent", FakeAgent)
    monkeypatch.setattr(agent_module, "tune_for_serving", lambda: steps.append("tune"))
    settings = make_settings(tmp_path)
    asyncio.run(agent_module.run_until_signalled(settings, NodeKey.generate()))
    assert steps == ["open", "tune", "serve", "close"]
