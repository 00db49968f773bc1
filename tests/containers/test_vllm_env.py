"""The vLLM engine's choices that need no vLLM: compile caches in the JIT cache when the agent
gave one (the only mount where a compiled kernel can be loaded), defaults by the device
found, and every visible GPU reported. torch is a double of the few calls made."""

from pathlib import Path

from containers.runtime.engines.vllm import (
    CPU_DEFAULTS,
    compile_cache_env,
    default_args,
    visible_devices,
)
from schemas import runtime_env
from worker.core.settings import Settings
from worker.runtime.api import LaunchSpec
from worker.runtime.launch import launch_env


def test_compile_caches_live_in_the_jit_cache() -> None:
    env = compile_cache_env("/jit")
    for name in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith("/jit/"), name
    assert all(value.startswith("/jit/") for value in env.values())
    assert len(set(env.values())) == len(env)


def test_without_a_jit_cache_nothing_is_redirected() -> None:
    assert compile_cache_env(None) == {}
    assert compile_cache_env("") == {}


class _Props:
    def __init__(self, name: str, uuid: str, total_memory: int) -> None:
        self.name, self.uuid, self.total_memory = name, uuid, total_memory


class _Cuda:
    """torch.cuda's few calls the engine makes, for a machine with `props` GPUs."""

    def __init__(self, props: list[_Props]) -> None:
        self._props = props

    def is_available(self) -> bool:
        return bool(self._props)

    def device_count(self) -> int:
        return len(self._props)

    def get_device_properties(self, index: int) -> _Props:
        return self._props[index]

    def get_device_name(self, index: int) -> str:
        return self._props[index].name


class _Torch:
    def __init__(self, props: list[_Props]) -> None:
        self.cuda = _Cuda(props)


def test_every_visible_gpu_is_reported() -> None:
    torch = _Torch(
        [
            _Props("NVIDIA H200", "0f1e2d3c-aaaa-bbbb-cccc-000000000001", 150 << 30),
            _Props("NVIDIA H200", "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000002", 150 << 30),
        ]
    )
    assert visible_devices(torch) == [
        {
            "name": "NVIDIA H200",
            "uuid": "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000001",
            "memory_bytes": 150 << 30,
        },
        {
            "name": "NVIDIA H200",
            "uuid": "GPU-0f1e2d3c-aaaa-bbbb-cccc-000000000002",
            "memory_bytes": 150 << 30,
        },
    ]
    assert visible_devices(_Torch([])) == []


def test_defaults_follow_the_device_found() -> None:
    assert default_args("cpu", {runtime_env.GPU_MEMORY_UTILIZATION: "0.5"}) == CPU_DEFAULTS
    gpu = default_args("NVIDIA H200", {runtime_env.GPU_MEMORY_UTILIZATION: "0.85"})
    assert gpu == {"gpu_memory_utilization": 0.85}  # vLLM's own: no eager, dtype from the model
    assert "enforce_eager" not in default_args("NVIDIA H200", {})
    assert "dtype" not in default_args("NVIDIA H200", {})


def test_the_node_passes_gpu_memory_share_only_to_gpu_runtimes(tmp_path: Path) -> None:
    spec = LaunchSpec("vllm", "img", tmp_path, "cd" * 32, {})
    cpu = launch_env(spec, Settings(), model_dir="/model")
    assert runtime_env.GPU_MEMORY_UTILIZATION not in cpu
    gpu = launch_env(
        spec, Settings(gpus="0", runtime_gpu_memory_utilization=0.8), model_dir="/model"
    )
    assert gpu[runtime_env.GPU_MEMORY_UTILIZATION] == "0.8"
