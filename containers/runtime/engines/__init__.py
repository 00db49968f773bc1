"""Engines run requests one step at a time: requests join (`add`) and leave (`abort`, or
when finished) between steps, and each `step` returns the frames it produced: at most one
`partial` per streaming request, and a `done` or `failed` for each request that ended.

Each engine lives in its own module and is imported only when chosen, so the echo image
needs nothing beyond msgpack.
"""

from collections.abc import Callable
from typing import Protocol

from containers.runtime.config import RuntimeConfig
from schemas.frames import (
    DeviceInfo,
    DoneFrame,
    EngineStats,
    FailedFrame,
    PartialFrame,
    RequestItem,
)

RawWriter = Callable[[bytes], None]
"""Writes bytes straight to the frame stream (only the echo engine's fault injection)."""

StepFrame = PartialFrame | DoneFrame | FailedFrame


class EngineError(RuntimeError):
    """The engine could not load; the runtime reports it in a `fatal` frame."""


class Engine(Protocol):
    name: str
    version: str
    device: str
    model_sha256: str
    max_active: int
    """How many requests the engine runs concurrently (reported in `ready`)."""
    devices: list[DeviceInfo]
    """Every accelerator the engine sees (reported in `ready`); empty on CPU."""

    def add(self, request_id: int, item: RequestItem, *, stream: bool) -> None:
        """Start a request; raises `RequestError` for one the engine cannot run."""
        ...

    def abort(self, request_id: int) -> bool:
        """Stop a request; True if it was running."""
        ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[StepFrame]:
        """One engine step over every running request."""
        ...

    def stats(self) -> EngineStats:
        """The engine's own figures now, for the next `pong` (must not block)."""
        ...

    def close(self) -> None:
        """Release the engine (child processes, memory) before the runtime exits."""
        ...


def load_engine(config: RuntimeConfig, write_raw: RawWriter) -> Engine:
    if config.engine == "echo":
        from containers.runtime.engines.echo import EchoEngine

        return EchoEngine.load(config, write_raw)
    if config.engine == "vllm":
        from containers.runtime.engines.vllm import VllmEngine

        return VllmEngine.load(config)
    raise EngineError(f"unknown engine {config.engine!r}: set RESULTITY_ENGINE to echo or vllm")
