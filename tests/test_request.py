"""The runtime's request layer without vLLM: chat rendering with the model's own template,
the new sampling parameters, and vLLM logprobs to the wire (the vLLM image runs the rest in
tests/test_vllm_runtime.py)."""

import importlib.util
import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

from containers.runtime.request import (
    LOGPROB_FLOOR,
    NoChatTemplate,
    RequestError,
    parse_request,
    plain_chat_text,
    prompt_token_ids,
    render_chat,
    sampling_kwargs,
    structured_outputs,
    wire_logprobs,
)
from worker.devtools import demomodel

HAS_TOKENIZERS = all(importlib.util.find_spec(m) for m in ("transformers", "tokenizers"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_chat_item_keeps_messages_and_gives_tokenizerless_engines_plain_text() -> None:
    req = parse_request("c", {"messages": CHAT, "params": {"logprobs": 2}})
    assert req.messages == (("system", "Be brief."), ("user", "Hi there"))
    assert req.prompt == plain_chat_text(req.messages)
    assert req.prompt == "<|system|>\nBe brief.\n<|user|>\nHi there\n"
    assert req.prompt_token_ids is None and req.logprobs == 2


def test_new_params_reach_the_sampling_arguments() -> None:
    params = {"logprobs": 3, "presence_penalty": -1.5, "frequency_penalty": 2, "top_k": 5}
    kwargs = sampling_kwargs(parse_request("p", {"prompt": "x", "params": params}))
    assert kwargs["logprobs"] == 3 and kwargs["top_k"] == 5
    assert kwargs["presence_penalty"] == -1.5 and kwargs["frequency_penalty"] == 2.0
    plain = sampling_kwargs(parse_request("p", {"prompt": "x"}))
    assert "logprobs" not in plain and plain["presence_penalty"] == 0.0


def test_response_format_maps_to_structured_outputs() -> None:
    assert structured_outputs({"type": "json_object"}) == {"json_object": True}
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    req = parse_request("j", {"prompt": "x", "params": {"response_format": fmt}})
    assert req.response_format == fmt
    assert json.loads(structured_outputs(fmt)["json"]) == schema


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"prompt": "x", "messages": CHAT}, "exactly one"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 1}]}, "content"),
        ({"messages": [{"role": "user"}]}, "role and content"),
        ({"prompt": "x", "params": {"logprobs": 21}}, "logprobs"),
        ({"prompt": "x", "params": {"logprobs": True}}, "logprobs"),
        ({"prompt": "x", "params": {"presence_penalty": 2.5}}, "presence_penalty"),
        ({"prompt": "x", "params": {"frequency_penalty": "1"}}, "frequency_penalty"),
        ({"prompt": "x", "params": {"response_format": {"type": "text"}}}, "response_format"),
        ({"prompt": "x", "params": {"response_format": {"type": "json_schema"}}}, "schema"),
    ],
)
def test_bad_items_are_request_errors(item: dict[str, Any], reason: str) -> None:
    with pytest.raises(RequestError, match=reason):
        parse_request("bad", item)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if not HAS_TOKENIZERS:
        pytest.skip("needs the models extra (transformers, tokenizers)")
    tok = demomodel._tokenizer()
    tok.chat_template = demomodel.CHAT_TEMPLATE
    return tok


def test_chat_renders_with_the_models_template_and_generation_prompt(tokenizer: Any) -> None:
    req = parse_request("c", {"messages": CHAT})
    ids = prompt_token_ids(req, tokenizer)
    assert tokenizer.decode(ids) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    )
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert render_chat(tokenizer, req.messages or ()) == ids


def test_a_model_without_chat_template_is_a_bad_request(tokenizer: Any) -> None:
    bare = demomodel._tokenizer()
    assert not bare.chat_template
    with pytest.raises(NoChatTemplate, match="no chat template"):
        prompt_token_ids(parse_request("c", {"messages": CHAT}), bare)
    # a prompt still runs on that model
    assert prompt_token_ids(parse_request("p", {"prompt": "Hi"}), bare)


def test_a_template_that_raises_is_a_bad_request(tokenizer: Any) -> None:
    strict = demomodel._tokenizer()
    strict.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(RequestError, match="only user turns"):
        render_chat(strict, (("user", "x"),))


@dataclass
class Logprob:
    """The shape of vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None


def test_wire_logprobs_give_the_chosen_token_and_the_top_n() -> None:
    out = CompletionOutput(
        token_ids=[7, 9],
        logprobs=[
            # greedy: the chosen token is also the best
            {7: Logprob(-0.1, 1), 3: Logprob(-2.5, 2), 4: Logprob(-3.0, 3)},
            # sampled outside the top 2: vLLM adds it with its own rank
            {5: Logprob(-0.2, 1), 6: Logprob(-1.0, 2), 9: Logprob(-7.0, 40)},
        ],
    )
    assert wire_logprobs(out, 2) == [
        {"token_id": 7, "logprob": -0.1, "top": [[7, -0.1], [3, -2.5]]},
        {"token_id": 9, "logprob": -7.0, "top": [[5, -0.2], [6, -1.0]]},
    ]
    assert [p["top"] for p in wire_logprobs(out, 0)] == [[], []]
    assert wire_logprobs(CompletionOutput([1], None), 2) == []


def test_wire_logprobs_are_finite() -> None:
    out = CompletionOutput([1], [{1: Logprob(-math.inf, 1), 2: Logprob(math.nan, 2)}])
    assert wire_logprobs(out, 2) == [
        {"token_id": 1, "logprob": LOGPROB_FLOOR, "top": [[1, LOGPROB_FLOOR], [2, LOGPROB_FLOOR]]}
    ]
