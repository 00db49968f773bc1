"""The runtime's configuration, read once from the environment (`schemas.runtime_env`)."""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import runtime_env
from schemas.limits import MAX_FRAME_BYTES


class ConfigError(ValueError):
    """An environment variable holds a value the runtime cannot use."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    engine: str = runtime_env.DEFAULT_ENGINE
    model_dir: Path = Path(runtime_env.DEFAULT_MODEL_DIR)
    model_sha256: str = ""
    engine_args: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    max_frame_bytes: int = MAX_FRAME_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RuntimeConfig":
        raw_args = env.get(runtime_env.ENGINE_ARGS, "").strip() or "{}"
        try:
            engine_args = json.loads(raw_args)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{runtime_env.ENGINE_ARGS} is not JSON: {exc}") from exc
        if not isinstance(engine_args, dict):
            raise ConfigError(f"{runtime_env.ENGINE_ARGS} must be a JSON object")
        raw_max = env.get(runtime_env.MAX_FRAME_BYTES, "").strip()
        try:
            max_frame_bytes = int(raw_max) if raw_max else MAX_FRAME_BYTES
        except ValueError as exc:
            raise ConfigError(
                f"{runtime_env.MAX_FRAME_BYTES} is not an integer: {raw_max!r}"
            ) from exc
        if max_frame_bytes < 1024:
            raise ConfigError(f"{runtime_env.MAX_FRAME_BYTES} must be at least 1024")
        return cls(
            engine=env.get(runtime_env.ENGINE, "").strip() or runtime_env.DEFAULT_ENGINE,
            model_dir=Path(env.get(runtime_env.MODEL_DIR, runtime_env.DEFAULT_MODEL_DIR)),
            model_sha256=env.get(runtime_env.MODEL_SHA256, "").strip().lower(),
            engine_args=engine_args,
            device=env.get(runtime_env.DEVICE, "").strip() or None,
            max_frame_bytes=max_frame_bytes,
        )
