"""Chat, logprobs, penalties and JSON output on real vLLM (the CPU runtime image, the tiny
demo model with its chat template), at the runtime's frame interface."""

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.frames import Frame
from tests.test_vllm_runtime import HAS_MODEL_DEPS, ContainerRuntime, _tiny_llama
from worker.devtools import images

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who signs?"}]
SCHEMA = {
    "type": "object",
    "properties": {"signed": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["signed", "n"],
    "additionalProperties": False,
}


def _item(job_id: str, **params: Any) -> Frame:
    return {"job_id": job_id, "messages": CHAT, "params": {"max_tokens": 8, **params}}


@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="renders the template on the host too")
def test_vllm_chat_logprobs_and_structured_output(docker_client: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    image_id = images.ensure_image("vllm-cpu", client=docker_client)
    model = _tiny_llama(tmp_path, image_id)
    tokenizer = AutoTokenizer.from_pretrained(model.directory)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    rendered_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert rendered.endswith("<|assistant|>\n")

    json_fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    bad_fmt = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "nope"}}}
    runtime = ContainerRuntime(image_id, model.directory, model.sha256)
    try:
        assert runtime.receive(timeout=300)["t"] == "ready"
        items = [
            _item("chat"),
            {"job_id": "ids", "prompt_token_ids": rendered_ids, "params": {"max_tokens": 8}},
            _item("logprobs", logprobs=3),
            _item("penalties", presence_penalty=2, frequency_penalty=-2, temperature=0.7, seed=1),
            _item("json_object", max_tokens=120, response_format={"type": "json_object"}),
            _item("json_schema", max_tokens=120, response_format=json_fmt),
            _item("bad_schema", response_format=bad_fmt),
        ]
        out = {o["job_id"]: o for o in runtime.run(1, items)}
        # The runtime is still there for the next batch: a bad schema failed one job only.
        again = runtime.run(2, [_item("again")])[0]
    finally:
        runtime.close()

    for name in ("chat", "ids", "logprobs", "penalties", "json_object", "json_schema"):
        assert "error" not in out[name], out[name]
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

    assert isinstance(json.loads(out["json_object"]["text"]), dict), out["json_object"]
    answer = json.loads(out["json_schema"]["text"])
    assert set(answer) == {"signed", "n"} and isinstance(answer["signed"], bool)
    assert "error" in out["bad_schema"] and "schema" in out["bad_schema"]["error"].lower()
