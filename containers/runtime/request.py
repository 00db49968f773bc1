"""One request as vLLM sees it: prompt token ids (chat `messages` rendered with the model's
own chat template) and `SamplingParams`; and vLLM's logprobs as the wire carries them.

The request item was validated by `schemas.frames.parse_request_item` (the job schema's
bounds, one set of rules on both sides of the pipe); what is left here is what only the
engine can judge: rendering messages with the model's template (only the one shipped in the
model directory's `tokenizer_config.json`, as loaded by the engine's tokenizer, never one
from the job), and options the engine refuses. Any of those is a `RequestError`: that
request fails as a bad request, the engine runs on.
"""

import ctypes
import importlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from schemas import runtime_env
from schemas.frames import MessageMap, ParamsMap, RequestItem, ResponseFormatMap, TokenLogprob
from schemas.limits import max_tokens

log = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0
"""What a token the engine ruled out (logprob -inf, e.g. by a JSON grammar) reports: JSON and
the result schema hold finite numbers only (OpenAI uses the same value)."""


class RequestError(ValueError):
    """The request cannot run on this engine/model; only that request fails (`failed`,
    code `bad_request`)."""


class NoChatTemplate(RequestError):
    """A chat request for a model whose tokenizer ships no chat template."""


T = TypeVar("T")

RENDER_TIMEOUT_S = float(os.environ.get(runtime_env.RENDER_TIMEOUT_S) or 2.0)
"""How long one chat may take to render. A model's template is code (Jinja, sandboxed, but
unbounded in time: nested loops over `range` ran 12 minutes); rendering runs on the engine's
thread, so a template past this fails its request and the engine runs on."""


class _RenderTimeout(BaseException):
    """Raised inside a render past its time; not an `Exception`, so that code catching
    those (a retry loop, a fallback) does not catch it."""


def bounded(call: Callable[[], T], timeout_s: float) -> T:
    """`call()` in a thread of its own; `RequestError` when it has not returned within
    `timeout_s` seconds.

    The thread is then stopped from outside: `_RenderTimeout` is raised in it (CPython's
    `PyThreadState_SetAsyncExc`) at its next bytecode, again every INTERRUPT_EVERY_S until
    it ends, so that no handler on the way out keeps it running. Python code stops at once
    (Jinja compiles a template to Python: its loops are Python loops); a call stuck in
    native code stops when it returns to Python."""
    render = _Render(call)
    render.thread.start()
    render.thread.join(timeout_s)
    if render.thread.is_alive():
        render.interrupt()
        raise RequestError(f"the model's chat template ran past {timeout_s:g}s: refused")
    ok, value = render.outcome[0]
    if ok:
        return cast(T, value)
    raise value


INTERRUPT_EVERY_S = 0.01
INTERRUPT_FOR_S = 1.0


class _Render:
    """One bounded call and its thread. `guard` orders the interruptions with the end of
    the call: none is sent once the thread said it is done, and the one it may still have
    pending then is cleared, so no interruption lands after the call's outcome is kept."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self.outcome: list[tuple[bool, Any]] = []
        self._guard = threading.Lock()
        self._done = False
        self.thread = threading.Thread(target=self._run, name="render", daemon=True)

    def _run(self) -> None:
        try:
            result: tuple[bool, Any] = (True, self._call())
        except BaseException as exc:  # the call's error for the caller, or the interruption
            result = (False, exc)
        while True:
            try:
                with self._guard:
                    self._done = True
                    _set_async_exc(threading.get_ident(), None)
                break
            except _RenderTimeout:
                continue  # sent before `done`: delivered now, and dropped
        self.outcome.append(result)

    def interrupt(self) -> None:
        """Raise `_RenderTimeout` in the thread until it ends, for at most INTERRUPT_FOR_S:
        a thread stuck in native code is left to finish on its own."""
        ident = self.thread.ident or 0
        for _ in range(int(INTERRUPT_FOR_S / INTERRUPT_EVERY_S)):
            with self._guard:
                if self._done:
                    return
                _set_async_exc(ident, _RenderTimeout)
            self.thread.join(INTERRUPT_EVERY_S)
        log.warning("render_not_stopped thread=%d: left to finish in native code", ident)


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None
    )


def render_chat(tokenizer: Any, messages: Sequence[MessageMap]) -> list[int]:
    """Token ids of `messages` rendered by the model's own chat template, with the
    generation prompt added. The template's text carries its special tokens, so none are
    added on encoding (as transformers does for a tokenized chat)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("the model ships no chat template: send 'prompt' instead")
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        text = bounded(
            lambda: tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            ),
            RENDER_TIMEOUT_S,
        )
    except RequestError:
        raise
    except Exception as exc:  # a template may reject a conversation (raise_exception)
        raise RequestError(f"the model's chat template rejected the messages: {exc}") from exc
    if not isinstance(text, str):
        raise RequestError("the model's chat template did not render text")
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def prompt_token_ids(item: RequestItem, tokenizer: Any) -> list[int]:
    """The token ids the engine runs: as given, the rendered chat, or the encoded prompt."""
    if "prompt_token_ids" in item:
        return list(item["prompt_token_ids"])
    if "messages" in item:
        return render_chat(tokenizer, item["messages"])
    ids: list[int] = tokenizer.encode(item["prompt"])
    return ids


def structured_outputs(response_format: ResponseFormatMap) -> dict[str, Any]:
    """vLLM's `StructuredOutputsParams` keyword arguments for a `response_format` (the
    backend, xgrammar without free whitespace, is set engine-wide: `STRUCTURED_OUTPUTS` in
    engines/vllm.py)."""
    if response_format["type"] == "json_object":
        return {"json_object": True}
    schema = response_format["json_schema"]["schema"]
    # vLLM hashes the spec as a cache key; a canonical string keeps equal schemas equal.
    return {"json": json.dumps(schema, sort_keys=True, separators=(",", ":"))}


def sampling_kwargs(params: ParamsMap) -> dict[str, Any]:
    """`SamplingParams` keyword arguments for `params`, without the structured-output
    object and the output kind (both vLLM objects)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens(params),
        "temperature": params.get("temperature", 0.0),
        "top_p": params.get("top_p", 1.0),
        "seed": params.get("seed"),
        "presence_penalty": params.get("presence_penalty", 0.0),
        "frequency_penalty": params.get("frequency_penalty", 0.0),
    }
    if "top_k" in params:
        kwargs["top_k"] = params["top_k"]
    if params.get("stop"):
        kwargs["stop"] = list(params["stop"])
    if "logprobs" in params:
        kwargs["logprobs"] = params["logprobs"]
    return kwargs


def to_vllm(item: RequestItem, tokenizer: Any) -> tuple[list[int], Any]:
    """(prompt token ids, `vllm.SamplingParams`) for vLLM's engine, outputs as deltas (vLLM
    imported here: only the vLLM image has it). Raises `RequestError` for a request this
    model cannot run."""
    sampling = importlib.import_module("vllm.sampling_params")
    ids = prompt_token_ids(item, tokenizer)
    params = item["params"]
    kwargs = sampling_kwargs(params)
    kwargs["output_kind"] = sampling.RequestOutputKind.DELTA
    if "response_format" in params:
        try:
            kwargs["structured_outputs"] = sampling.StructuredOutputsParams(
                **structured_outputs(params["response_format"])
            )
        except Exception as exc:  # vLLM's own checks: ValueError or a VLLMClientError
            raise RequestError(f"response_format: {type(exc).__name__}: {exc}") from exc
    try:
        return ids, sampling.SamplingParams(**kwargs)
    except Exception as exc:  # vLLM's own checks: ValueError or a VLLMClientError
        raise RequestError(f"sampling parameters: {type(exc).__name__}: {exc}") from exc


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def wire_logprobs(completion: Any, n: int) -> list[TokenLogprob]:
    """`logprobs` of a `done` frame (and the result's `output.logprobs`) for a vLLM
    `CompletionOutput` asked for `n` alternatives: per generated token, its id, its logprob
    and the `n` most likely tokens as `[id, logprob]` (which may include the chosen one, as
    in OpenAI's `top_logprobs`). A delta output gives the entries of its new tokens."""
    positions = completion.logprobs
    if positions is None:
        return []
    out: list[TokenLogprob] = []
    for token_id, position in zip(completion.token_ids, positions, strict=False):
        entries = dict(position or {})
        chosen = entries.get(token_id)
        ranked = sorted(
            entries.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0, -kv[1].logprob)
        )
        out.append(
            {
                "token_id": int(token_id),
                "logprob": _finite(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
                "top": [[int(t), _finite(lp.logprob)] for t, lp in ranked[:n]],
            }
        )
    return out
