"""Streaming requests at the supervisor's seam: a request that streams, and a sink for its
partials that the test can wait on."""

import asyncio

from worker.runtime.api import Partial, WorkItem


def streaming(job_id: str, prompt: str = "long", max_tokens: int = 100_000) -> WorkItem:
    """A streaming request long enough to be still running when the test acts on it."""
    return WorkItem(job_id, {"prompt": prompt, "params": {"max_tokens": max_tokens}}, stream=True)


class Sink:
    """Collects a streaming request's partials; `first` is set on the first one."""

    def __init__(self) -> None:
        self.parts: list[Partial] = []
        self.first = asyncio.Event()

    def __call__(self, part: Partial) -> None:
        self.parts.append(part)
        self.first.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for p in self.parts for t in p.token_ids]
