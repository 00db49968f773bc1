"""One batch item as the engines see it: the prompt and validated sampling parameters."""

from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """One item of a batch is invalid; only that job fails."""


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


def _number(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"params.{key} must be a number")
    return float(value)


def _integer(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"params.{key} must be an integer")
    return value


def parse_request(job_id: str, item: dict[str, Any]) -> Request:
    """Validate one item (its `job_id` already checked); raise `RequestError` if unusable."""
    prompt = item.get("prompt")
    token_ids = item.get("prompt_token_ids")
    if (prompt is None) == (token_ids is None):
        raise RequestError("exactly one of prompt and prompt_token_ids is required")
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError("prompt must be a string")
    if token_ids is not None:
        if not isinstance(token_ids, list) or not token_ids:
            raise RequestError("prompt_token_ids must be a non-empty list")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise RequestError("prompt_token_ids must hold non-negative integers")
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError("params must be a map")
    max_tokens = _integer(params, "max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise RequestError("params.max_tokens must be >= 1")
    temperature = _number(params, "temperature", 0.0)
    if not 0.0 <= temperature <= 2.0:
        raise RequestError("params.temperature must be within 0-2")
    top_p = _number(params, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise RequestError("params.top_p must be within (0, 1]")
    stop = params.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("params.stop must be a list of non-empty strings")
    return Request(
        job_id=job_id,
        prompt=prompt,
        prompt_token_ids=token_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_integer(params, "top_k"),
        seed=_integer(params, "seed"),
        stop=tuple(stop),
    )
