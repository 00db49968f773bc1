"""An in-process agent for tests: run it, and wait until it serves."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from worker.core.settings import Settings
from worker.core.signing import load_key_file
from worker.node.agent import Agent


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Agent]:
    """An agent serving in a task of its own until the block ends."""
    stop = asyncio.Event()
    agent = Agent(settings, load_key_file(settings.key_file))
    async with agent:
        task = asyncio.create_task(agent.serve(stop))
        try:
            yield agent
        finally:
            stop.set()
            await task


async def serving(agent: Agent, timeout: float = 60, config_version: int = 0) -> None:
    """Return once the agent serves its model (under a snapshot newer than `config_version`)."""
    await asyncio.wait_for(agent.wait_serving(config_version), timeout)
