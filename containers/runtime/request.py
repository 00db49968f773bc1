"""One request as vLLM sees it: prompt token ids (chat `messages` rendered with the model's
own chat template) and `SamplingParams`; and vLLM's logprobs as the wire carries them.

The request item was validated by `schemas.frames.parse_request_item` (the job schema's
bounds, one set of rules on both sides of the pipe); what is left here is what only the
engine can judge: rendering messages with the model's template (only the one shipped in the
model directory's `tokenizer_config.json`, as loaded by the engine's tokenizer, never one
from the job), and options the engine refuses. Any of those is a `RequestError`: that
request fails as a bad request, the engine runs on.
"""

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TypeVar

from schemas import runtime_env
from schemas.frames import MessageMap, ParamsMap, RequestItem, ResponseFormatMap, TokenLogprob
from schemas.limits import max_tokens

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


class _RenderTimeout(Exception):
    pass


def bounded(call: Callable[[], T], timeout_s: float) -> T:
    """`call()`, stopped with `RequestError` once it has run `timeout_s` seconds.

    A trace function on this thread checks the clock at every line and call of the Python
    code `call` runs (Jinja compiles a template to Python, so a template's loops are seen)
    and raises inside it once the time is up; it raises again at every later line, so no
    `except` on the way out can swallow it. Only for the length of `call`."""
    end = time.monotonic() + timeout_s

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > end:
            raise _RenderTimeout
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return call()
    except _RenderTimeout:
        timed_out = True
    except Exception:
        if time.monotonic() <= end:
            raise
        timed_out = True  # the timeout, wrapped by code on the way out
    finally:
        sys.settrace(previous)
    assert timed_out
    raise RequestError(f"the model's chat template ran past {timeout_s:g}s: refused")


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
