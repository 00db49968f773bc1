"""Engines turn a whole batch of requests into one outcome per request, in one call.

Each engine lives in its own module and is imported only when chosen, so the echo image
needs nothing beyond msgpack.
"""

from collections.abc import Callable
from typing import Protocol

from containers.runtime.config import RuntimeConfig
from containers.runtime.request import Request
from schemas.frames import Frame

RawWriter = Callable[[bytes], None]
"""Writes bytes straight to the frame stream (only the echo engine's fault injection)."""


class EngineError(RuntimeError):
    """The engine could not load; the runtime reports it in a `fatal` frame."""


class Engine(Protocol):
    name: str
    version: str
    device: str
    model_sha256: str

    def generate(self, requests: list[Request]) -> list[Frame]:
        """One `frames.ok` or `frames.failed` map per request, in order."""
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
