"""The launch environment of `python -m containers.runtime`: the agent's half of the
contract in `schemas.runtime_env`, used by every backend."""

import json

from schemas import runtime_env
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec


def launch_env(spec: LaunchSpec, settings: Settings, *, model_dir: str) -> dict[str, str]:
    """The environment a runtime starts with (besides what its backend adds)."""
    env = {
        runtime_env.ENGINE: spec.engine,
        runtime_env.MODEL_DIR: model_dir,
        runtime_env.MODEL_SHA256: spec.model_sha256,
        runtime_env.ENGINE_ARGS: json.dumps(spec.engine_args, sort_keys=True),
        runtime_env.MAX_FRAME_BYTES: str(settings.runtime_max_frame_bytes),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
    }
    if settings.gpu_ids() is not None:
        env[runtime_env.GPU_MEMORY_UTILIZATION] = str(settings.runtime_gpu_memory_utilization)
    return env
