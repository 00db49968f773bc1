"""The runtime's configuration, read once from `RESULTITY_*` environment variables.

RESULTITY_ENGINE           echo | vllm (default echo)
RESULTITY_MODEL_DIR        the model, mounted read-only (default /model)
RESULTITY_MODEL_SHA256     the model archive's SHA-256, reported in `ready`
RESULTITY_ENGINE_ARGS      a JSON map of engine arguments
RESULTITY_DEVICE           overrides the device reported in `ready`
RESULTITY_MAX_FRAME_BYTES  the largest frame accepted (default schemas.frames.MAX_FRAME_BYTES)
RESULTITY_VLLM_CACHE_SEED  vllm: a directory copied into VLLM_CACHE_ROOT at start
RESULTITY_ECHO_FAULT       echo: `noready` never sends `ready` (tests)
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.frames import MAX_FRAME_BYTES


class ConfigError(ValueError):
    """An environment variable holds a value the runtime cannot use."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    engine: str = "echo"
    model_dir: Path = Path("/model")
    model_sha256: str = ""
    engine_args: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RuntimeConfig":
        raw_args = env.get("RESULTITY_ENGINE_ARGS", "").strip() or "{}"
        try:
            engine_args = json.loads(raw_args)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"RESULTITY_ENGINE_ARGS is not JSON: {exc}") from exc
        if not isinstance(engine_args, dict):
            raise ConfigError("RESULTITY_ENGINE_ARGS must be a JSON object")
        raw_max = env.get("RESULTITY_MAX_FRAME_BYTES", "").strip()
        try:
            max_frame_bytes = int(raw_max) if raw_max else MAX_FRAME_BYTES
        except ValueError as exc:
            raise ConfigError(f"RESULTITY_MAX_FRAME_BYTES is not an integer: {raw_max!r}") from exc
        if max_frame_bytes < 1024:
            raise ConfigError("RESULTITY_MAX_FRAME_BYTES must be at least 1024")
        return cls(
            engine=env.get("RESULTITY_ENGINE", "echo").strip() or "echo",
            model_dir=Path(env.get("RESULTITY_MODEL_DIR", "/model")),
            model_sha256=env.get("RESULTITY_MODEL_SHA256", "").strip().lower(),
            engine_args=engine_args,
            device=env.get("RESULTITY_DEVICE", "").strip() or None,
            max_frame_bytes=max_frame_bytes,
        )
