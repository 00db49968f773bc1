"""The official `openai` client through the gateway against a node running real vLLM (the
CPU runtime image in Docker, the tiny demo model): chat rendered with the model's template,
streaming, completions, logprobs and JSON output, each answer's provenance verified."""

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from tests.support.gateway import check_provenance, client, node_settings, serving_node
from tests.support.vllm import HAS_MODEL_DEPS
from worker.core.signing import NodeKey
from worker.devtools.devnet import DevPlan, seed_network
from worker.devtools.natsd import NatsServer
from worker.gateway.app import running as gateway

CHAT = [{"role": "user", "content": "Who signs the results?"}]


@pytest.mark.nats
@pytest.mark.docker
@pytest.mark.vllm
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not HAS_MODEL_DEPS, reason="needs the models extra (torch, transformers)")
async def test_openai_client_against_vllm(
    docker_client: Any, nats_server: NatsServer, tmp_path: Path, nc: Client, vectors_dir: Path
) -> None:
    from transformers import AutoTokenizer

    authority = NodeKey.generate()
    settings = node_settings(
        nats_server,
        tmp_path,
        authority,
        runtime_backend="docker",
        runtime_memory="4g",
        request_timeout_s=300,
        runtime_ready_timeout_s=600,
    )
    plan = DevPlan(tmp_path / "dev", 0, "vllm", "docker", "hi", vectors_dir=vectors_dir)
    snapshot = await seed_network(settings, authority, plan, version=1)
    model = snapshot.models[0].id
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "dev" / "models" / model)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    rendered_tokens = len(tokenizer.encode(rendered, add_special_tokens=False))

    async with (
        serving_node(settings, timeout=900),
        gateway(settings, port=0) as url,
        client(url) as api,
    ):
        assert [m.id for m in (await api.models.list()).data] == [model]

        chat = await api.chat.completions.create(
            model=model,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=8,
            logprobs=True,
            top_logprobs=3,
        )
        text = chat.choices[0].message.content or ""
        check_provenance((chat.model_extra or {})["resultity"], snapshot, text)
        assert chat.usage is not None and chat.usage.prompt_tokens == rendered_tokens
        logprobs = chat.choices[0].logprobs
        assert logprobs is not None and logprobs.content
        assert len(logprobs.content) == chat.usage.completion_tokens
        assert all(len(t.top_logprobs) == 3 for t in logprobs.content)

        stream = await api.chat.completions.create(
            model=model,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == text  # greedy: the same answer, streamed

        done = await api.completions.create(model=model, prompt="The node signs", max_tokens=8)
        check_provenance((done.model_extra or {})["resultity"], snapshot, done.choices[0].text)

        structured = await api.chat.completions.create(
            model=model,
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=120,
            response_format={"type": "json_object"},
        )
        content = structured.choices[0].message.content or ""
        assert isinstance(json.loads(content), dict), content
