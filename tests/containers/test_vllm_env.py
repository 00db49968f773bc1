"""Where the vLLM engine's compile caches go: the JIT cache when the agent gave one (the only
mount where a compiled kernel can be loaded), else nowhere special. Pure: no vLLM needed."""

from containers.runtime.engines.vllm import compile_cache_env


def test_compile_caches_live_in_the_jit_cache() -> None:
    env = compile_cache_env("/jit")
    for name in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith("/jit/"), name
    assert all(value.startswith("/jit/") for value in env.values())
    assert len(set(env.values())) == len(env)


def test_without_a_jit_cache_nothing_is_redirected() -> None:
    assert compile_cache_env(None) == {}
    assert compile_cache_env("") == {}
