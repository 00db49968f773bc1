"""The vLLM engine: vLLM's own engine (v1 `LLMEngine`) stepped by the runtime loop, so
requests join and leave between steps: vLLM's continuous batching.

On CPU the defaults are those found to work in `shared/VLLM_CPU.md` (float32, eager, an
explicit KV-cache size); `RESULTITY_ENGINE_ARGS` overrides or extends the `LLM` keyword
arguments. No model hub is ever contacted: the hub libraries are set offline before import.
"""

import importlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from containers.runtime.config import RuntimeConfig
from containers.runtime.engines import EngineError, StepFrame
from containers.runtime.request import RequestError, to_vllm, wire_logprobs
from schemas import frames, runtime_env
from schemas.frames import DeviceInfo, EngineStats, FailCode, RequestItem, TokenLogprob

log = logging.getLogger(__name__)

CPU_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 256,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
}
"""What works on CPU (no compiler in the image: eager, see `prepare_environment`)."""


def default_args(device: str, env: Mapping[str, str]) -> dict[str, Any]:
    """vLLM arguments by the device the runtime found, before the snapshot's engine args.

    On a GPU, vLLM's own defaults: CUDA graphs and torch.compile on (no `enforce_eager`,
    compile caches in the JIT cache), dtype from the model's config (or the execution
    class's engine args); only the share of GPU memory comes from the node's settings."""
    if device == "cpu":
        return dict(CPU_DEFAULTS)
    defaults: dict[str, Any] = {}
    if env.get(runtime_env.GPU_MEMORY_UTILIZATION):
        defaults["gpu_memory_utilization"] = float(env[runtime_env.GPU_MEMORY_UTILIZATION])
    return defaults


STRUCTURED_OUTPUTS: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}
"""JSON output (`response_format`) by xgrammar (vLLM's default; a schema it cannot compile
fails its job), without free whitespace: a model allowed any may spend its `max_tokens` on it
(the random-weight demo model does), leaving an unfinished document."""


def prepare_environment() -> None:
    """Offline hubs, no telemetry, caches on the runtime's tmpfs mounts (the root filesystem
    is read-only): compile caches, whose files are loaded as code, in the JIT cache
    (`RESULTITY_JIT_CACHE`, the one mount that allows exec), the rest under /tmp."""
    tmp = os.environ.setdefault("TMPDIR", "/tmp")
    jit = os.environ.get(runtime_env.JIT_CACHE)
    for key, value in compile_cache_env(jit).items():
        os.environ.setdefault(key, value)
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HOME": tmp,
        "XDG_CACHE_HOME": f"{tmp}/.cache",
        "HF_HOME": f"{tmp}/.cache/huggingface",
        "VLLM_CACHE_ROOT": f"{tmp}/vllm-cache",
        "VLLM_CONFIG_ROOT": f"{tmp}/vllm-config",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    if os.environ.get("HOME") not in (None, "", "/", "/nonexistent"):
        defaults.pop("HOME")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    seed = os.environ.get(runtime_env.VLLM_CACHE_SEED)
    if seed and Path(seed).is_dir():
        # Pre-computed model-architecture facts (see vllm-cpu.Dockerfile): saves ~7 s a start.
        shutil.copytree(seed, os.environ["VLLM_CACHE_ROOT"], dirs_exist_ok=True)
    if shutil.which("g++") is None and shutil.which("c++") is None:
        # Without a compiler even eager mode dies compiling a helper on the first request.
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def compile_cache_env(jit: str | None) -> dict[str, str]:
    """Where vLLM, Triton, TorchInductor, torch's C++ extensions and CUDA put what they
    compile: under `jit`, or nowhere special without one (they then fall under /tmp, where
    nothing can be loaded: the CPU image compiles nothing)."""
    if not jit:
        return {}
    return {
        "VLLM_CACHE_ROOT": f"{jit}/vllm",
        "XDG_CACHE_HOME": f"{jit}/xdg",
        "TRITON_CACHE_DIR": f"{jit}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{jit}/inductor",
        "TORCH_EXTENSIONS_DIR": f"{jit}/torch-extensions",
        "CUDA_CACHE_PATH": f"{jit}/nv",
    }


def _device(torch: Any) -> str:
    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return "cpu"


def visible_devices(torch: Any) -> list[DeviceInfo]:
    """Every GPU this process sees (the ones the node passed in), for `ready.devices`."""
    if not torch.cuda.is_available():
        return []
    devices: list[DeviceInfo] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid and not uuid.startswith(("GPU-", "MIG-")):
            uuid = f"GPU-{uuid}"  # torch prints the bare UUID; NVML and Docker prefix it
        devices.append(
            {"name": str(props.name), "uuid": uuid, "memory_bytes": int(props.total_memory)}
        )
    return devices


@dataclass(eq=False)
class _Run:
    request_id: int
    stream: bool
    prompt_tokens: int
    added_at: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: int | None = None
    """Alternatives per token the request asked for; None: no logprobs."""
    structured: bool = False
    """The request has a `response_format`."""
    wire_logprobs: list[TokenLogprob] = field(default_factory=list)


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        llm: Any,
        client_error: type[Exception],
        *,
        version: str,
        device: str,
        model_sha256: str,
        devices: list[DeviceInfo] | None = None,
    ) -> None:
        self._llm = llm
        self.devices = list(devices or [])
        self._engine = llm.llm_engine
        self._client_error = client_error
        self.version = version
        self.device = device
        self.model_sha256 = model_sha256
        self._tokenizer = llm.get_tokenizer()
        model_config = self._engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        scheduler = getattr(self._engine.vllm_config, "scheduler_config", None)
        self.max_active = int(getattr(scheduler, "max_num_seqs", 0) or 0)
        self._runs: dict[int, _Run] = {}
        self._scheduler_stats: Any = None
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._watch_scheduler_stats()

    def _watch_scheduler_stats(self) -> None:
        """Keep the scheduler's figures (`SchedulerStats`: running and waiting requests,
        KV-cache use, prefix-cache lookups this step) from each step's engine-core outputs.

        `LLMEngine.step` hands them only to its stat loggers, which `LLM` gives no way to
        add to, so the engine-core client's `get_output` is wrapped here; the default
        loggers (a throughput line every few seconds, an unserved Prometheus registry)
        are dropped, as they were with stats off."""
        core: Any = getattr(self._engine, "engine_core", None)
        get_output = getattr(core, "get_output", None)
        if get_output is None:
            log.warning("vllm_stats_unavailable reason=no engine_core.get_output")
            return

        def get_output_keeping_stats() -> Any:
            outputs = get_output()
            stats = getattr(outputs, "scheduler_stats", None)
            if stats is not None:
                self._scheduler_stats = stats
                prefix = getattr(stats, "prefix_cache_stats", None)
                if prefix is not None:
                    self._prefix_queries += int(prefix.queries)
                    self._prefix_hits += int(prefix.hits)
            return outputs

        core.get_output = get_output_keeping_stats
        if hasattr(self._engine, "logger_manager"):
            self._engine.logger_manager = None

    @classmethod
    def load(cls, config: RuntimeConfig) -> "VllmEngine":
        if not (config.model_dir / "config.json").is_file():
            raise EngineError(f"{config.model_dir} holds no config.json (is the model mounted?)")
        prepare_environment()
        vllm = importlib.import_module("vllm")
        torch = importlib.import_module("torch")
        device = _device(torch)
        kwargs: dict[str, Any] = {
            "model": str(config.model_dir),
            "seed": 0,
            "structured_outputs_config": STRUCTURED_OUTPUTS,
            # The engine core then sends its scheduler's figures with every step's
            # outputs (`stats`); `LLM` turns them off unless asked.
            "disable_log_stats": False,
        }
        kwargs.update(default_args(device, os.environ))
        kwargs.update(config.engine_args)
        log.info("vllm_loading version=%s device=%s args=%s", vllm.__version__, device, kwargs)
        llm = vllm.LLM(**kwargs)
        return cls(
            llm,
            importlib.import_module("vllm.exceptions").VLLMClientError,
            version=str(vllm.__version__),
            device=config.device or device,
            model_sha256=config.model_sha256,
            devices=visible_devices(torch),
        )

    # -- Engine ------------------------------------------------------------------------

    def add(self, request_id: int, item: RequestItem, *, stream: bool) -> None:
        token_ids, sampling = to_vllm(item, self._tokenizer)
        if token_ids and max(token_ids) >= self._vocab_size:
            raise RequestError(f"token id {max(token_ids)} is outside the vocabulary")
        if len(token_ids) >= self._max_model_len:
            raise RequestError(
                f"prompt of {len(token_ids)} tokens does not fit max_model_len "
                f"{self._max_model_len}"
            )
        try:
            self._engine.add_request(str(request_id), {"prompt_token_ids": token_ids}, sampling)
        except (ValueError, TypeError, self._client_error) as exc:
            # vLLM's request checks (parameters, a JSON schema its grammar cannot compile)
            raise RequestError(f"{type(exc).__name__}: {exc}") from exc
        params = item["params"]
        self._runs[request_id] = _Run(
            request_id,
            stream,
            len(token_ids),
            logprobs=params.get("logprobs"),
            structured="response_format" in params,
        )

    def abort(self, request_id: int) -> bool:
        if self._runs.pop(request_id, None) is None:
            return False
        self._engine.abort_request([str(request_id)])
        return True

    def has_unfinished(self) -> bool:
        return bool(self._runs)

    def step(self) -> list[StepFrame]:
        out: list[StepFrame] = []
        for output in self._engine.step():
            run = self._runs.get(_request_id(output.request_id))
            if run is None:
                continue  # aborted meanwhile
            completion = output.outputs[0]
            new_ids = list(completion.token_ids)
            if new_ids and run.first_token_s is None:
                run.first_token_s = time.perf_counter() - run.added_at
            run.token_ids.extend(new_ids)
            run.text.append(completion.text)
            if run.logprobs is not None:
                run.wire_logprobs.extend(wire_logprobs(completion, run.logprobs))
            if not output.finished:
                if run.stream and new_ids:
                    out.append(frames.partial(run.request_id, new_ids, completion.text))
                continue
            del self._runs[run.request_id]
            out.append(self._finish(run, completion.finish_reason))
        return out

    def stats(self) -> EngineStats:
        stats = self._scheduler_stats
        if stats is None:  # no step yet
            return {"running": len(self._runs), "waiting": 0}
        if not self._runs:
            # Idle: no step has run since the last request left, so the last figures are
            # those of a step that still held it; freed blocks count as free.
            return {
                "running": 0,
                "waiting": 0,
                "kv_cache_usage": 0.0,
                "prefix_cache_queries": self._prefix_queries,
                "prefix_cache_hits": self._prefix_hits,
            }
        return {
            "running": int(stats.num_running_reqs),
            "waiting": int(stats.num_waiting_reqs) + int(stats.num_skipped_waiting_reqs),
            "kv_cache_usage": min(1.0, max(0.0, float(stats.kv_cache_usage))),
            "prefix_cache_queries": self._prefix_queries,
            "prefix_cache_hits": self._prefix_hits,
        }

    def close(self) -> None:
        # Stops the engine-core and worker processes now rather than from atexit hooks.
        engine_core = getattr(self._engine, "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _finish(self, run: _Run, reason: str | None) -> StepFrame:
        if reason == "error" and run.structured and not run.token_ids:
            # vLLM checks a schema when the request is added, and fails a request whose
            # grammar then does not compile with "error" before its first token.
            return frames.failed(
                run.request_id,
                FailCode.BAD_REQUEST,
                "the engine could not compile the response_format schema",
            )
        if reason not in ("stop", "length"):
            return frames.failed(run.request_id, FailCode.ENGINE, f"generation ended: {reason}")
        return frames.done(
            run.request_id,
            token_ids=run.token_ids,
            text="".join(run.text),
            finish_reason=reason,
            prompt_tokens=run.prompt_tokens,
            first_token_s=run.first_token_s or 0.0,
            logprobs=run.wire_logprobs if run.logprobs is not None else None,
        )


def _request_id(engine_id: str) -> int:
    """Our request id from vLLM's: the external id, or the internal `<external>-<random>`."""
    head = engine_id.split("-", 1)[0]
    return int(head) if head.isdigit() else -1
