"""What the agent needs from a runtime, whatever runs it (Docker container or local process).

The supervisor implements `Runtime`; the pipeline and the validator only use this surface.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from worker.core.errors import NodeError


@dataclass(frozen=True, slots=True)
class RuntimeFacts:
    """What the runtime reported in its `ready` frame, plus the image it runs in."""

    engine: str
    engine_version: str
    model_sha256: str
    device: str
    image: str


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything needed to start one runtime: engine, image, model, engine arguments."""

    engine: str
    image: str
    model_dir: Path
    model_sha256: str
    engine_args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One job as the runtime sees it: `payload` holds `prompt` or `prompt_token_ids` and
    `params`, exactly the item map of a `batch` frame minus `job_id`."""

    job_id: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Completion:
    job_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


ItemOutcome = Completion | NodeError


class Runtime(Protocol):
    @property
    def facts(self) -> RuntimeFacts: ...

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        """One outcome per item, in order. A retryable `RuntimeFailure` means the job may be
        tried again; `ItemFailed` or `OutputMalformed` are final for that job."""
        ...
