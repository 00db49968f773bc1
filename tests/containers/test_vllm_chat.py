"""Chat, logprobs, penalties and JSON output on real vLLM (the CPU runtime image, the tiny
demo model with its chat template), at the runtime's frame interface (frames v2): every
feature through the engine loop, and each request error a `failed` frame with code
`bad_request` while the runtime runs on."""

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.frames import FailCode
from tests.support.payloads import json_schema_format
from tests.support.vllm import HAS_MODEL_DEPS, ContainerRuntime, tiny_llama
from worker.devtools import demomodel, images

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who signs?"}]
SCHEMA = {
    "type": "object",
    "properties": {"signed": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["signed", "n"],
    "additionalProperties": False,
}


def _chat(**params: Any) -> dict[str, Any]:
    return {"messages": CHAT, "params": {"max_tokens": 8, **params}}


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="renders the template on the host too")
def test_vllm_chat_logprobs_and_structured_output(docker_client: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = tiny_llama(tmp_path / "chat", image_id)
    tokenizer = AutoTokenizer.from_pretrained(model.directory)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    rendered_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|assistant|>\n")
    # the same model without its chat template
    bare = demomodel.make_demo_model(tmp_path / "bare", "llama")
    config = bare.directory / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    (bare.directory / "chat_template.jinja").unlink(missing_ok=True)

    bad_schema = json_schema_format({"type": "nope"}, name="b")
    runtime = ContainerRuntime(image_id, model.directory, model.sha256)
    try:
        assert runtime.receive(timeout=300)["t"] == "ready"
        requests = {
            "chat": _chat(),
            "ids": {"prompt_token_ids": rendered_ids, "params": {"max_tokens": 8}},
            "logprobs": _chat(logprobs=3),
            "penalties": _chat(presence_penalty=2, frequency_penalty=-2, temperature=0.7, seed=1),
            "json_object": _chat(max_tokens=120, response_format={"type": "json_object"}),
            "json_schema": _chat(max_tokens=120, response_format=json_schema_format(SCHEMA)),
            "bad_schema": _chat(response_format=bad_schema),
            "too_many_logprobs_for_vllm": _chat(logprobs=20, max_tokens=2),
        }
        ids = {name: runtime.submit(r) for name, r in requests.items()}
        streamed = runtime.submit(_chat(logprobs=2), stream=True)
        out = {name: runtime.outcome(i) for name, i in ids.items()}
        stream_done = runtime.outcome(streamed)
        # The runtime is still there: a bad request failed alone.
        again = runtime.alone(_chat())
    finally:
        runtime.close()

    bare_runtime = ContainerRuntime(image_id, bare.directory, bare.sha256)
    try:
        assert bare_runtime.receive(timeout=300)["t"] == "ready"
        no_template = bare_runtime.alone(_chat())
        prompt_still_runs = bare_runtime.alone({"prompt": "Who signs?", "params": {}})
    finally:
        bare_runtime.close()

    for name in ("chat", "ids", "logprobs", "penalties", "json_object", "json_schema"):
        assert out[name]["t"] == "done", out[name]
    # The node rendered the model's own template with the generation prompt.
    assert out["chat"]["prompt_tokens"] == len(rendered_ids)
    assert out["chat"]["token_ids"] == out["ids"]["token_ids"] == again["token_ids"]

    logprobs = out["logprobs"]["logprobs"]
    assert [e["token_id"] for e in logprobs] == out["logprobs"]["token_ids"]
    for entry in logprobs:
        assert len(entry["top"]) == 3 and entry["logprob"] <= 0
        best_id, best_lp = entry["top"][0]
        assert best_id == entry["token_id"] and best_lp == pytest.approx(entry["logprob"])
        assert [lp for _, lp in entry["top"]] == sorted(
            (lp for _, lp in entry["top"]), reverse=True
        )
    assert "logprobs" not in out["chat"]
    # streamed in deltas: one logprob entry per token of the whole answer
    assert stream_done["t"] == "done"
    assert [e["token_id"] for e in stream_done["logprobs"]] == stream_done["token_ids"]
    assert stream_done["token_ids"] == out["chat"]["token_ids"]
    assert runtime.partials(streamed)

    assert isinstance(json.loads(out["json_object"]["text"]), dict), out["json_object"]
    answer = json.loads(out["json_schema"]["text"])
    assert set(answer) == {"signed", "n"} and isinstance(answer["signed"], bool)

    failed = out["bad_schema"]
    assert failed["t"] == "failed" and failed["code"] == FailCode.BAD_REQUEST, failed
    assert "schema" in failed["reason"].lower() or "json" in failed["reason"].lower(), failed
    # within the job schema's 20, above what this engine allows (its max_logprobs) or not
    lp20 = out["too_many_logprobs_for_vllm"]
    assert lp20["t"] == "done" or lp20["code"] == FailCode.BAD_REQUEST, lp20

    assert no_template["t"] == "failed" and no_template["code"] == FailCode.BAD_REQUEST
    assert "chat template" in no_template["reason"]
    assert prompt_still_runs["t"] == "done", prompt_still_runs


SLOW_TEMPLATE = (
    "{% if messages | length > 1 %}"
    "{% for a in range(100000) %}{% for b in range(100000) %}"
    "{{ messages[0]['content'] }}{% endfor %}{% endfor %}"
    "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
"""Nested loops in Jinja's sandbox (minutes to hours, no call it refuses) for a conversation
of more than one message: vLLM's own warm-up at load renders one message, unbounded (a
template slow for every conversation never lets the runtime say `ready`; the agent's ready
timeout ends that one)."""


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_vllm_a_chat_template_past_its_time_fails_alone(docker_client: Any, tmp_path: Path) -> None:
    """Issue 20 item 10: a model whose chat template renders for ever. Its chat request
    fails as a bad request at the render bound, and the runtime serves the next request."""
    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = tiny_llama(tmp_path / "slow", image_id)
    config = model.directory / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = SLOW_TEMPLATE
    config.write_text(json.dumps(settings))
    (model.directory / "chat_template.jinja").unlink(missing_ok=True)
    runtime = ContainerRuntime(image_id, model.directory, model.sha256)
    try:
        assert runtime.receive(timeout=300)["t"] == "ready"
        slow = runtime.alone(_chat())
        after = runtime.alone({"prompt": "Who signs?", "params": {"max_tokens": 4}})
    finally:
        runtime.close()
    assert slow["t"] == "failed" and slow["code"] == FailCode.BAD_REQUEST, slow
    assert "chat template ran past" in slow["reason"], slow
    assert after["t"] == "done", after
