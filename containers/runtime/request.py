"""One request as the engines see it: the prompt and validated sampling parameters, and its
conversion to vLLM's inputs (`to_vllm`) and of vLLM's logprobs to the wire (`wire_logprobs`).

The agent validated the job against `schemas.job` already; this module checks again what an
engine relies on, because the runtime image carries no `schemas.job`. Chat `messages` are
rendered only with the chat template shipped in the model directory (its
`tokenizer_config.json`, as loaded by the engine's tokenizer), never with one from the job.
"""

import importlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20
ROLES = ("system", "user", "assistant")
LOGPROB_FLOOR = -9999.0
"""What a token the engine ruled out (logprob -inf, e.g. by a JSON grammar) reports: JSON and
the result schema hold finite numbers only (OpenAI uses the same value)."""

Message = tuple[str, str]


class RequestError(ValueError):
    """One request is invalid (the BAD_REQUEST class): only that job fails, the engine runs
    on."""


class NoChatTemplate(RequestError):
    """A chat job for a model whose tokenizer ships no chat template."""


@dataclass(frozen=True, slots=True)
class Request:
    job_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    messages: tuple[Message, ...] | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: Mapping[str, Any] | None = None


def plain_chat_text(messages: Iterable[Message]) -> str:
    """The text an engine without a tokenizer (echo) takes for a chat: one `<|role|>` line
    before each message's content. Never used by vLLM, which renders the model's template."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages)


def _number(params: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"params.{key} must be a number")
    if not low <= value <= high:
        raise RequestError(f"params.{key} must be within {low:g}..{high:g}")
    return float(value)


def _integer(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"params.{key} must be an integer")
    return value


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise RequestError("each message must be a map of role and content")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise RequestError(f"message role must be one of {ROLES} and content a string")
        out.append((m["role"], m["content"]))
    return tuple(out)


def _response_format(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("params.response_format must be a map")
    kind = value.get("type")
    if kind == "json_object":
        return value
    spec = value.get("json_schema")
    if kind == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        return value
    raise RequestError("params.response_format must be json_object or json_schema with a schema")


def parse_request(job_id: str, item: dict[str, Any]) -> Request:
    """Validate one item (its `job_id` already checked); raise `RequestError` if unusable."""
    prompt = item.get("prompt")
    token_ids = item.get("prompt_token_ids")
    raw_messages = item.get("messages")
    if sum(x is not None for x in (prompt, token_ids, raw_messages)) != 1:
        raise RequestError("exactly one of prompt, prompt_token_ids and messages is required")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError("prompt must be a string")
    if token_ids is not None:
        if not isinstance(token_ids, list) or not token_ids:
            raise RequestError("prompt_token_ids must be a non-empty list")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise RequestError("prompt_token_ids must hold non-negative integers")
    messages = None if raw_messages is None else _messages(raw_messages)
    if messages is not None:
        prompt = plain_chat_text(messages)
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError("params must be a map")
    max_tokens = _integer(params, "max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise RequestError("params.max_tokens must be >= 1")
    top_p = _number(params, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("params.top_p must be within (0, 1]")
    logprobs = _integer(params, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"params.logprobs must be within 0..{MAX_LOGPROBS}")
    stop = params.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("params.stop must be a list of non-empty strings")
    return Request(
        job_id=job_id,
        prompt=prompt,
        prompt_token_ids=token_ids,
        max_tokens=max_tokens,
        temperature=_number(params, "temperature", 0.0, 0.0, 2.0),
        top_p=top_p,
        top_k=_integer(params, "top_k"),
        seed=_integer(params, "seed"),
        stop=tuple(stop),
        messages=messages,
        logprobs=logprobs,
        presence_penalty=_number(params, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(params, "frequency_penalty", 0.0, -2.0, 2.0),
        response_format=_response_format(params.get("response_format")),
    )


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of `messages` rendered by the model's own chat template, with the
    generation prompt added. The template's text carries its special tokens, so none are
    added on encoding (as transformers does for a tokenized chat)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("the model ships no chat template; send a prompt instead")
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a template may reject a conversation (raise_exception)
        raise RequestError(f"the model's chat template rejected the messages: {exc}") from exc
    if not isinstance(text, str):
        raise RequestError("the model's chat template did not render text")
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def prompt_token_ids(req: Request, tokenizer: Any) -> list[int]:
    """The token ids the engine runs: as given, the rendered chat, or the encoded prompt."""
    if req.messages is not None:
        return render_chat(tokenizer, req.messages)
    if req.prompt_token_ids is not None:
        return list(req.prompt_token_ids)
    assert req.prompt is not None
    ids: list[int] = tokenizer.encode(req.prompt)
    return ids


def structured_outputs(response_format: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's `StructuredOutputsParams` keyword arguments for an OpenAI `response_format`
    (free whitespace is off engine-wide: see `STRUCTURED_OUTPUTS` in engines/vllm.py)."""
    if response_format["type"] == "json_object":
        return {"json_object": True}
    schema = response_format["json_schema"]["schema"]
    # vLLM hashes the spec as a cache key; a canonical string keeps equal schemas equal.
    return {"json": json.dumps(schema, sort_keys=True, separators=(",", ":"))}


def sampling_kwargs(req: Request) -> dict[str, Any]:
    """`SamplingParams` keyword arguments for `req`, without the structured-output object."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
    }
    if req.top_k is not None:
        kwargs["top_k"] = req.top_k
    if req.stop:
        kwargs["stop"] = list(req.stop)
    if req.logprobs is not None:
        kwargs["logprobs"] = req.logprobs
    return kwargs


def to_vllm(req: Request, tokenizer: Any) -> tuple[list[int], Any]:
    """The prompt token ids and `vllm.SamplingParams` for `req` (vLLM imported here: only
    the vLLM image has it). Raises `RequestError` for a request this model cannot run."""
    sampling = importlib.import_module("vllm.sampling_params")
    ids = prompt_token_ids(req, tokenizer)
    kwargs = sampling_kwargs(req)
    if req.response_format is not None:
        try:
            kwargs["structured_outputs"] = sampling.StructuredOutputsParams(
                **structured_outputs(req.response_format)
            )
        except Exception as exc:
            raise RequestError(f"response_format: {exc}") from exc
    try:
        return ids, sampling.SamplingParams(**kwargs)
    except Exception as exc:  # vLLM's own checks raise ValueError or VLLMValidationError
        raise RequestError(f"sampling parameters: {exc}") from exc


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def wire_logprobs(completion: Any, n: int) -> list[dict[str, Any]]:
    """`output.logprobs` for a vLLM `CompletionOutput` asked for `n` alternatives: per
    generated token, its id, its logprob and the `n` most likely tokens as `[id, logprob]`
    (which may include the chosen one, as in OpenAI's `top_logprobs`)."""
    positions = completion.logprobs
    if positions is None:
        return []
    out = []
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
