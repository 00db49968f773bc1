"""The vLLM engine: one `vllm.LLM` over the mounted model, one `generate()` per batch.

On CPU the defaults are those found to work in `shared/VLLM_CPU.md` (float32, eager, an
explicit KV-cache size); `RESULTITY_ENGINE_ARGS` overrides or extends the `LLM` keyword
arguments. No model hub is ever contacted: the hub libraries are set offline before import.
"""

import importlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from containers.runtime.config import RuntimeConfig
from containers.runtime.engines import EngineError
from containers.runtime.request import Request, RequestError, to_vllm, wire_logprobs
from schemas.frames import Frame, failed, ok

log = logging.getLogger(__name__)

CPU_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 256,
    "enforce_eager": True,
    "kv_cache_memory_bytes": 256 << 20,
}

STRUCTURED_OUTPUTS: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}
"""JSON output (`response_format`) by xgrammar (vLLM's default; a schema it cannot compile
fails its job), without free whitespace: a model allowed any may spend its `max_tokens` on it
(the random-weight demo model does), leaving an unfinished document."""


def prepare_environment() -> None:
    """Offline hubs, no telemetry, every cache under /tmp (the root filesystem is read-only)."""
    tmp = os.environ.setdefault("TMPDIR", "/tmp")
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
    seed = os.environ.get("RESULTITY_VLLM_CACHE_SEED")
    if seed and Path(seed).is_dir():
        # Pre-computed model-architecture facts (see vllm-cpu.Dockerfile): saves ~7 s a start.
        shutil.copytree(seed, os.environ["VLLM_CACHE_ROOT"], dirs_exist_ok=True)
    if shutil.which("g++") is None and shutil.which("c++") is None:
        # Without a compiler even eager mode dies compiling a helper on the first request.
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def _device(torch: Any) -> str:
    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return "cpu"


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
    ) -> None:
        self._llm = llm
        self._client_error = client_error
        self.version = version
        self.device = device
        self.model_sha256 = model_sha256
        self._tokenizer = llm.get_tokenizer()
        model_config = llm.llm_engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())

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
        }
        if device == "cpu":
            kwargs.update(CPU_DEFAULTS)
        kwargs.update(config.engine_args)
        log.info("vllm_loading version=%s device=%s args=%s", vllm.__version__, device, kwargs)
        llm = vllm.LLM(**kwargs)
        return cls(
            llm,
            importlib.import_module("vllm.exceptions").VLLMClientError,
            version=str(vllm.__version__),
            device=config.device or device,
            model_sha256=config.model_sha256,
        )

    def generate(self, requests: list[Request]) -> list[Frame]:
        outcomes: list[Frame | None] = []
        prompts: list[dict[str, Any]] = []
        params: list[Any] = []
        for req in requests:
            try:
                prompt, sampling = self._prepare(req)
            except ValueError as exc:
                outcomes.append(failed(req.job_id, str(exc)))
                continue
            outcomes.append(None)
            prompts.append(prompt)
            params.append(sampling)
        accepted = [r for r, o in zip(requests, outcomes, strict=True) if o is None]
        answers = self._generate(accepted, prompts, params)
        produced = iter(answers)
        return [o if o is not None else next(produced) for o in outcomes]

    def close(self) -> None:
        # Stops the engine-core and worker processes now rather than from atexit hooks.
        engine_core = getattr(self._llm.llm_engine, "engine_core", None)
        shutdown = getattr(engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def _prepare(self, req: Request) -> tuple[dict[str, Any], Any]:
        token_ids, sampling = to_vllm(req, self._tokenizer)
        if token_ids and max(token_ids) >= self._vocab_size:
            raise RequestError(f"token id {max(token_ids)} is outside the vocabulary")
        if len(token_ids) >= self._max_model_len:
            raise RequestError(
                f"prompt of {len(token_ids)} tokens does not fit max_model_len "
                f"{self._max_model_len}"
            )
        return {"prompt_token_ids": token_ids}, sampling

    def _generate(
        self, requests: list[Request], prompts: list[dict[str, Any]], params: list[Any]
    ) -> list[Frame]:
        if not requests:
            return []
        try:
            started = time.perf_counter()
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
            log.info(
                "vllm_generate items=%d seconds=%.4f", len(prompts), time.perf_counter() - started
            )
        except (ValueError, TypeError, self._client_error) as exc:
            if len(requests) == 1:
                return [failed(requests[0].job_id, f"{type(exc).__name__}: {exc}")]
            # vLLM rejects the whole call for one bad request: find it, run the rest.
            log.warning("vllm_batch_rejected items=%d error=%s", len(requests), exc)
            return [
                answer
                for i in range(len(requests))
                for answer in self._generate(
                    requests[i : i + 1], prompts[i : i + 1], params[i : i + 1]
                )
            ]
        return [self._answer(req, out) for req, out in zip(requests, outputs, strict=True)]

    def _answer(self, req: Request, output: Any) -> Frame:
        completion = output.outputs[0]
        reason = "stop" if completion.finish_reason == "stop" else "length"
        if completion.finish_reason not in ("stop", "length"):
            return failed(req.job_id, f"generation ended: {completion.finish_reason}")
        frame = ok(
            req.job_id,
            completion.text,
            list(completion.token_ids),
            reason,
            len(output.prompt_token_ids or []),
        )
        if req.logprobs is not None:
            frame["logprobs"] = wire_logprobs(completion, req.logprobs)
        return frame
