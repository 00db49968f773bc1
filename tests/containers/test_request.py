"""The runtime's request layer without vLLM: chat rendering with the model's own template,
the new sampling parameters, and vLLM logprobs to the wire (the vLLM image runs the rest in
tests/containers/test_vllm_chat.py). Items are parsed as the runtime parses them
(`schemas.frames.parse_request_item`); bad items are tested in tests/schemas/test_frames.py."""

import importlib.util
import json
import math
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from containers.runtime.engines.echo import _source
from containers.runtime.request import (
    LOGPROB_FLOOR,
    RENDER_TIMEOUT_S,
    NoChatTemplate,
    RequestError,
    bounded,
    prompt_token_ids,
    render_chat,
    sampling_kwargs,
    structured_outputs,
    wire_logprobs,
)
from schemas.frames import RequestItem, TokenLogprob, parse_request_item
from schemas.limits import DEFAULT_MAX_TOKENS
from worker.devtools import demomodel

HAS_TOKENIZERS = all(importlib.util.find_spec(m) for m in ("transformers", "tokenizers"))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def item(**fields: Any) -> RequestItem:
    return parse_request_item({"params": {}, **fields})


def test_chat_item_keeps_messages_and_echo_renders_role_lines() -> None:
    chat = item(messages=CHAT, params={"logprobs": 2})
    assert chat["messages"] == CHAT and chat["params"] == {"logprobs": 2}
    text = b"system: Be brief.\nuser: Hi there"
    assert _source(chat) == (text, len(text))


def test_new_params_reach_the_sampling_arguments() -> None:
    params = {"logprobs": 3, "presence_penalty": -1.5, "frequency_penalty": 2, "top_k": 5}
    kwargs = sampling_kwargs(item(prompt="x", params=params)["params"])
    assert kwargs["logprobs"] == 3 and kwargs["top_k"] == 5
    assert kwargs["presence_penalty"] == -1.5 and kwargs["frequency_penalty"] == 2.0
    plain = sampling_kwargs(item(prompt="x")["params"])
    assert "logprobs" not in plain and plain["presence_penalty"] == 0.0
    assert plain["max_tokens"] == DEFAULT_MAX_TOKENS and plain["temperature"] == 0.0
    assert "structured_outputs" not in plain and "output_kind" not in plain


def test_response_format_maps_to_structured_outputs() -> None:
    fmt_object = item(prompt="x", params={"response_format": {"type": "json_object"}})
    assert structured_outputs(fmt_object["params"]["response_format"]) == {"json_object": True}
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    parsed = item(prompt="x", params={"response_format": fmt})["params"]["response_format"]
    assert parsed == fmt
    spec = structured_outputs(parsed)["json"]
    assert json.loads(spec) == schema
    # canonical: equal schemas give equal specs (vLLM caches grammars by it)
    reordered = dict(reversed(list(schema.items())))
    again = {"type": "json_schema", "json_schema": {"name": "m", "schema": reordered}}
    parsed = item(prompt="x", params={"response_format": again})["params"]["response_format"]
    assert structured_outputs(parsed)["json"] == spec


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if not HAS_TOKENIZERS:
        pytest.skip("needs the models extra (transformers, tokenizers)")
    tok = demomodel._tokenizer()
    tok.chat_template = demomodel.CHAT_TEMPLATE
    return tok


def test_chat_renders_with_the_models_template_and_generation_prompt(tokenizer: Any) -> None:
    chat = item(messages=CHAT)
    ids = prompt_token_ids(chat, tokenizer)
    assert tokenizer.decode(ids) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    )
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert render_chat(tokenizer, chat["messages"]) == ids


def test_prompts_and_token_ids_need_no_template(tokenizer: Any) -> None:
    assert prompt_token_ids(item(prompt_token_ids=[5, 6, 7]), tokenizer) == [5, 6, 7]
    assert prompt_token_ids(item(prompt="Hi"), tokenizer) == tokenizer.encode("Hi")


def test_a_model_without_chat_template_is_a_bad_request(tokenizer: Any) -> None:
    bare = demomodel._tokenizer()
    assert not bare.chat_template
    with pytest.raises(NoChatTemplate, match="no chat template"):
        prompt_token_ids(item(messages=CHAT), bare)
    assert issubclass(NoChatTemplate, RequestError)
    # a prompt still runs on that model
    assert prompt_token_ids(item(prompt="Hi"), bare)


def test_a_template_that_raises_is_a_bad_request(tokenizer: Any) -> None:
    strict = demomodel._tokenizer()
    strict.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(RequestError, match="only user turns"):
        render_chat(strict, [{"role": "user", "content": "x"}])


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
    expected: list[TokenLogprob] = [
        {"token_id": 7, "logprob": -0.1, "top": [[7, -0.1], [3, -2.5]]},
        {"token_id": 9, "logprob": -7.0, "top": [[5, -0.2], [6, -1.0]]},
    ]
    assert wire_logprobs(out, 2) == expected
    assert [p["top"] for p in wire_logprobs(out, 0)] == [[], []]
    assert wire_logprobs(CompletionOutput([1], None), 2) == []
    # a delta output (one step's new tokens) gives the entries of those tokens only
    step = CompletionOutput([9], [{5: Logprob(-0.2, 1), 6: Logprob(-1.0, 2), 9: Logprob(-7.0, 40)}])
    assert wire_logprobs(step, 2) == expected[1:]


def test_wire_logprobs_are_finite() -> None:
    out = CompletionOutput([1], [{1: Logprob(-math.inf, 1), 2: Logprob(math.nan, 2)}])
    assert wire_logprobs(out, 2) == [
        {"token_id": 1, "logprob": LOGPROB_FLOOR, "top": [[1, LOGPROB_FLOOR], [2, LOGPROB_FLOOR]]}
    ]


HOSTILE = (
    "{% for a in range(100000) %}{% for b in range(100000) %}"
    "{{ messages[0]['content'] }}{% endfor %}{% endfor %}"
)
"""Nested loops in the sandbox: about 10^10 steps (minutes to hours), no call it refuses."""


def test_a_template_that_runs_too_long_is_a_bad_request_and_rendering_goes_on(
    tokenizer: Any,
) -> None:
    # Issue 20 item 10 (templates): before the bound this render ran for minutes (the test
    # timeout ended it).
    slow = demomodel._tokenizer()
    slow.chat_template = HOSTILE
    with pytest.raises(RequestError, match="ran past 0.5s"):
        bounded(
            lambda: slow.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            ),
            0.5,
        )
    assert not [t for t in threading.enumerate() if t.name == "render"]
    with pytest.raises(RequestError, match=f"ran past {RENDER_TIMEOUT_S:g}s"):
        render_chat(slow, [{"role": "user", "content": "x"}])
    # the next request renders as before
    test_chat_renders_with_the_models_template_and_generation_prompt(tokenizer)


def test_the_bound_lets_errors_and_values_through() -> None:
    assert bounded(lambda: 42, 1.0) == 42

    def broken() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        bounded(broken, 1.0)


def test_code_that_swallows_the_interruption_is_stopped_all_the_same() -> None:
    def stubborn() -> None:
        while True:
            try:
                while True:
                    pass
            except Exception:
                continue

    with pytest.raises(RequestError, match="ran past 0.2s"):
        bounded(stubborn, 0.2)
    assert not [t for t in threading.enumerate() if t.name == "render"]
