"""One request as vLLM sees it: prompt token ids and `SamplingParams`.

The request item was validated by `schemas.frames.parse_request_item` (the job schema's
bounds); what is left here is what only the engine can judge: rendering messages with the
model's chat template, and options the engine refuses.
"""

import importlib
from typing import Any

from schemas.frames import RequestItem
from schemas.limits import DEFAULT_MAX_TOKENS


class RequestError(ValueError):
    """The request cannot run on this engine/model; only that request fails."""


def prompt_token_ids(item: RequestItem, tokenizer: Any) -> list[int]:
    if "prompt_token_ids" in item:
        return list(item["prompt_token_ids"])
    if "messages" in item:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("the model has no chat template: send 'prompt' instead")
        rendered = tokenizer.apply_chat_template(
            [dict(m) for m in item["messages"]], add_generation_prompt=True, tokenize=True
        )
        return list(rendered)
    ids: list[int] = tokenizer.encode(item["prompt"])
    return ids


def to_vllm(item: RequestItem, tokenizer: Any) -> tuple[list[int], Any]:
    """(prompt token ids, SamplingParams) for vLLM's engine; outputs come as deltas."""
    sampling = importlib.import_module("vllm.sampling_params")
    params = item["params"]
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": params.get("max_tokens", DEFAULT_MAX_TOKENS),
        "temperature": params.get("temperature", 0.0),
        "top_p": params.get("top_p", 1.0),
        "seed": params.get("seed"),
        "output_kind": sampling.RequestOutputKind.DELTA,
    }
    if "top_k" in params:
        kwargs["top_k"] = params["top_k"]
    if params.get("stop"):
        kwargs["stop"] = list(params["stop"])
    try:
        return prompt_token_ids(item, tokenizer), sampling.SamplingParams(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{type(exc).__name__}: {exc}") from exc
