"""What the agent needs from a runtime, whatever runs it (Docker container or local process).

The supervisor implements `Runtime`; the pipeline and the validator only use this surface.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from schemas.frames import RequestItem
from worker.core.errors import NodeError


@dataclass(frozen=True, slots=True)
class Device:
    """One accelerator the runtime reported in `ready`."""

    name: str
    uuid: str
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class RuntimeFacts:
    """What the runtime reported in its `ready` frame, plus the image it runs in."""

    engine: str
    engine_version: str
    model_sha256: str
    device: str
    image: str
    max_active: int = 0
    """How many requests the engine runs concurrently (0: it did not say)."""
    devices: tuple[Device, ...] = ()
    """Every accelerator the runtime sees; empty on CPU."""
    execution_class: str = ""
    """The node's execution class the runtime was launched for ("": not said)."""


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one runtime: engine, image, model, engine arguments."""

    engine: str
    image: str
    model_dir: Path
    model_sha256: str
    engine_args: dict[str, Any]
    execution_class: str = ""
    """The node's execution class (worker.runtime.hardware), carried into results."""


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One job as the runtime sees it: `request` is the `request` map of its `submit` frame
    (`prompt`, `prompt_token_ids` or `messages`, and `params`), built once from the
    validated job (`schemas.job.Prompted.request_item`)."""

    job_id: str
    request: RequestItem
    stream: bool = False
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    job_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    first_token_s: float = 0.0
    logprobs: list[dict[str, Any]] | None = field(default=None)


@dataclass(frozen=True, slots=True)
class Partial:
    """New output of a streaming request (one `partial` frame)."""

    token_ids: list[int]
    text: str


PartialSink = Callable[[Partial], None]
"""Called from the frame reader for each `partial`: must not block."""

ItemOutcome = Completion | NodeError


class Runtime(Protocol):
    @property
    def facts(self) -> RuntimeFacts: ...

    async def generate(self, item: WorkItem, on_partial: PartialSink | None = None) -> Completion:
        """Run one request. Raises a `NodeError`: a retryable `RuntimeFailure` means the job
        may be tried again; `ItemFailed`, `BadRequest`, `DeadlineExceeded` are final.
        Cancelling the call aborts the request in the engine."""
        ...

    def submit(
        self, item: WorkItem, on_partial: PartialSink | None = None
    ) -> "asyncio.Future[Completion]":
        """Start one request without waiting for it: the future completes as `generate`
        returns or raises; cancelling it aborts the request. What the pipeline uses: a
        runtime that can, answers without a task per request."""
        ...

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        """`generate` for each item, concurrently; one outcome per item, in order."""
        ...


def submit_in_task(
    runtime: Runtime, item: WorkItem, on_partial: PartialSink | None = None
) -> "asyncio.Future[Completion]":
    """`Runtime.submit` for a runtime with no cheaper way: `generate` in a task (a task is
    a future; cancelling it cancels `generate`)."""
    return asyncio.ensure_future(runtime.generate(item, on_partial))
