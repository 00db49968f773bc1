"""Valid example payloads for the schema tests, and a helper to break them one field at a time."""

import copy
from typing import Any

NODE_ID = "ab" * 32
SHA = "0123456789abcdef" * 4
IMAGE_ID = "sha256:" + "cd" * 32
IMAGE_DIGEST = "registry.local/rst/runtime-cpu:1.0@sha256:" + "ef" * 32

DELETE = object()


def job() -> dict[str, Any]:
    return {
        "job_id": "job-1_A",
        "model_id": "tiny-model_1",
        "prompt": "Hello",
        "params": {
            "max_tokens": 16,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 7,
            "stop": ["\n"],
        },
        "deadline": 1_700_000_000.5,
    }


def chat_job() -> dict[str, Any]:
    return {
        "job_id": "chat-1",
        "model_id": "tiny-model_1",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again"},
        ],
        "params": {"max_tokens": 8, "logprobs": 3, "presence_penalty": 0.5},
    }


def json_schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    """A `response_format` of type `json_schema`; `extra` keys go into `json_schema`."""
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, **extra}}


def nested(depth: int) -> dict[str, Any]:
    """A JSON Schema-like map nested `depth` levels deep."""
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"a": value}}
    return value


def result_body() -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "node_id": NODE_ID,
        "network": "devnet",
        "model": {"id": "tiny", "version": "1", "sha256": SHA},
        "runtime": {
            "image": IMAGE_ID,
            "engine": "echo",
            "engine_version": "0.1",
            "device": "cpu",
        },
        "config_version": 3,
        "input_sha256": SHA,
        "output": {"text": "hi", "token_ids": [1, 2], "finish_reason": "length"},
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "attempt": 1,
        "started_at": 1_700_000_000.0,
        "finished_at": 1_700_000_001,
    }


def error_event() -> dict[str, Any]:
    return {
        "node_id": NODE_ID,
        "network": "devnet",
        "code": "BAD_REQUEST",
        "message": "job_id: String should match pattern",
        "retryable": False,
        "at": 1_700_000_000.0,
        "job_id": "job-1",
        "attempt": 2,
    }


def lifecycle_event() -> dict[str, Any]:
    return {
        "node_id": NODE_ID,
        "network": "devnet",
        "kind": "model_ready",
        "at": 1_700_000_000.0,
        "details": {"model": "tiny", "sha256": SHA},
    }


def vector() -> dict[str, Any]:
    return {"prompt_token_ids": [1, 2, 3], "params": {"max_tokens": 4}, "expected_sha256": SHA}


def model_spec() -> dict[str, Any]:
    return {
        "id": "tiny",
        "version": "2024-01",
        "sha256": SHA,
        "size": 1234,
        "source": "nats-object://rst_models/tiny.gguf",
        "validation": [vector()],
    }


def runtime_spec() -> dict[str, Any]:
    return {
        "name": "cpu",
        "image": IMAGE_DIGEST,
        "engine": "echo",
        "engine_args": {"token_delay_ms": 1},
    }


def snapshot() -> dict[str, Any]:
    second = model_spec() | {"id": "other", "source": "https://models.example/other.bin"}
    return {
        "network": "devnet",
        "version": 1,
        "issued_at": 1_700_000_000.0,
        "runtime": runtime_spec(),
        "models": [model_spec(), second],
    }


def changed(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `payload` with the dotted `path` set to `value` (or removed with DELETE).

    Integer path parts index lists: `models.0.size`.
    """
    out = copy.deepcopy(payload)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out
