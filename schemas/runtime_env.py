"""The environment contract between the agent and `python -m containers.runtime`, written once.

The agent (worker/runtime/launch) sets these variables when it starts a runtime; the runtime
(containers/runtime/config.py) reads them. Standard library only: imported in the image.
"""

ENGINE = "RESULTITY_ENGINE"
"""echo | vllm (default echo)"""
MODEL_DIR = "RESULTITY_MODEL_DIR"
"""the model, mounted read-only (default /model)"""
MODEL_SHA256 = "RESULTITY_MODEL_SHA256"
"""the model archive's SHA-256, reported in `ready`"""
ENGINE_ARGS = "RESULTITY_ENGINE_ARGS"
"""a JSON map of engine arguments"""
DEVICE = "RESULTITY_DEVICE"
"""overrides the device reported in `ready`"""
MAX_FRAME_BYTES = "RESULTITY_MAX_FRAME_BYTES"
"""the largest frame accepted (default schemas.frames.MAX_FRAME_BYTES)"""
VLLM_CACHE_SEED = "RESULTITY_VLLM_CACHE_SEED"
"""vllm: a directory copied into VLLM_CACHE_ROOT at start"""
JIT_CACHE = "RESULTITY_JIT_CACHE"
"""the one writable directory whose files may be loaded as code (compiled kernels); unset:
the runtime compiles nothing it would have to load"""
GPU_MEMORY_UTILIZATION = "RESULTITY_GPU_MEMORY_UTILIZATION"
"""vllm on a GPU: the share of each GPU's memory it may take (set on GPU nodes only)"""
RENDER_TIMEOUT_S = "RESULTITY_RENDER_TIMEOUT_S"
"""how long one chat may take to render with the model's template (default 2)"""
ECHO_FAULT = "RESULTITY_ECHO_FAULT"
"""echo: `noready` never sends `ready` (tests)"""

DEFAULT_ENGINE = "echo"
DEFAULT_MODEL_DIR = "/model"
