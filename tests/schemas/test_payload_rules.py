"""Every rule of PROTOCOL.md's payload tables, each with a payload that breaks it."""

from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from schemas import frames
from schemas.codec import decode, encode
from schemas.errors import SchemaError
from schemas.event import ErrorCode, ErrorEvent, LifecycleEvent, LifecycleKind
from schemas.job import Job, Params
from schemas.limits import (
    MAX_ENVELOPE_BYTES,
    MAX_NEW_TOKENS,
    MAX_TOKEN_ID,
    RESULT_RESERVED_BYTES,
    TOKEN_ID_BYTES,
)
from schemas.result import ResultBody
from schemas.snapshot import ModelSpec, RuntimeSpec, Snapshot, ValidationVector
from tests.support.payloads import (
    DELETE,
    IMAGE_DIGEST,
    IMAGE_ID,
    NODE_ID,
    SHA,
    changed,
    chat_job,
    error_event,
    job,
    json_schema_format,
    lifecycle_event,
    model_spec,
    nested,
    result_body,
    runtime_spec,
    snapshot,
    vector,
)


def packed(payload: Any) -> bytes:
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return data


def rejects(model: type[BaseModel], payload: Any, field: str) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(model, packed(payload))
    assert field in str(info.value), f"{field!r} not named in {str(info.value)!r}"
    return info.value


VALID = [
    (Job, job()),
    (Job, changed(changed(job(), "prompt", DELETE), "prompt_token_ids", [0, 5, 2**31 - 1])),
    (Job, {"job_id": "a", "model_id": "m", "prompt": ""}),
    (Job, {"job_id": "a" * 128, "model_id": "m" * 64, "prompt": "x", "params": {}}),
    (Job, chat_job()),
    (Job, changed(chat_job(), "messages", [{"role": "user", "content": ""}] * 256)),
    (Params, {"temperature": 0, "top_p": 1}),
    (Params, {"logprobs": 0, "presence_penalty": -2, "frequency_penalty": 2.0}),
    (Params, {"logprobs": 20, "response_format": {"type": "json_object"}}),
    (Params, {"response_format": json_schema_format({"type": "object"})}),
    (Params, {"response_format": json_schema_format({}, strict=True, description="d")}),
    (Params, {"temperature": 2.0, "top_p": 1e-9, "max_tokens": 1, "top_k": -1, "seed": 0}),
    (ResultBody, result_body()),
    (ResultBody, changed(result_body(), "output.finish_reason", "stop")),
    (ErrorEvent, error_event()),
    (ErrorEvent, changed(changed(error_event(), "job_id", DELETE), "attempt", DELETE)),
    (LifecycleEvent, lifecycle_event()),
    (LifecycleEvent, changed(lifecycle_event(), "details", DELETE)),
    (Snapshot, snapshot()),
    (Snapshot, changed(snapshot(), "runtime.image", IMAGE_ID)),
    (ModelSpec, model_spec()),
    (ModelSpec, changed(model_spec(), "validation", DELETE)),
    (RuntimeSpec, runtime_spec()),
    (ValidationVector, vector()),
    (ValidationVector, changed(changed(vector(), "prompt_token_ids", DELETE), "prompt", "hi")),
]


@pytest.mark.parametrize(("model", "payload"), VALID)
def test_valid_payloads_decode_and_round_trip(model: type[BaseModel], payload: Any) -> None:
    decoded = decode(model, packed(payload))
    assert decode(model, encode(decoded)) == decoded


def test_job_defaults() -> None:
    decoded = decode(Job, packed({"job_id": "a", "model_id": "m", "prompt_token_ids": [1]}))
    assert decoded.params.temperature == 0
    assert decoded.deadline is None


def test_every_error_code_and_lifecycle_kind_decodes() -> None:
    for code in ErrorCode:
        assert decode(ErrorEvent, packed(changed(error_event(), "code", code.value))).code == code
    for kind in LifecycleKind:
        event = decode(LifecycleEvent, packed(changed(lifecycle_event(), "kind", kind.value)))
        assert event.kind == kind
    assert {c.value for c in ErrorCode} == {
        "BAD_REQUEST",
        "UNKNOWN_MODEL",
        "DEADLINE_EXCEEDED",
        "RUNTIME_FAILURE",
        "OUTPUT_MALFORMED",
        "MODEL_INVALID",
        "CONFIG_REJECTED",
        "INTERNAL",
        "CANCELLED",
    }
    assert {k.value for k in LifecycleKind} == {
        "started",
        "config_applied",
        "model_ready",
        "model_removed",
        "model_state",
        "runtime_started",
        "runtime_replaced",
        "validation_passed",
        "stopping",
    }


# (path, bad value, field the message must name)
JOB_REJECTS = [
    ("job_id", DELETE, "job_id"),
    ("job_id", "", "job_id"),
    ("job_id", "a" * 129, "job_id"),
    ("job_id", "job.1", "job_id"),
    ("job_id", "job 1", "job_id"),
    ("job_id", "job>", "job_id"),
    ("job_id", "jöb", "job_id"),
    ("job_id", "job\n", "job_id"),
    ("job_id", 12, "job_id"),
    ("job_id", b"job-1", "job_id"),
    ("model_id", DELETE, "model_id"),
    ("model_id", "", "model_id"),
    ("model_id", "m" * 65, "model_id"),
    ("model_id", "a.b", "model_id"),
    ("model_id", "a*", "model_id"),
    ("model_id", None, "model_id"),
    ("prompt", DELETE, "prompt_token_ids"),
    ("prompt_token_ids", [1, 2], "prompt_token_ids"),
    ("prompt", 5, "prompt"),
    ("prompt", b"Hello", "prompt"),
    ("prompt", ["Hello"], "prompt"),
    ("prompt", "x" * (256 * 1024 + 1), "prompt"),
    ("params", [], "params"),
    ("params", "greedy", "params"),
    ("params.max_tokens", 0, "max_tokens"),
    ("params.max_tokens", -1, "max_tokens"),
    ("params.max_tokens", 1.0, "max_tokens"),
    ("params.max_tokens", "16", "max_tokens"),
    ("params.max_tokens", True, "max_tokens"),
    ("params.max_tokens", 300_000, "max_tokens"),
    ("params.max_tokens", MAX_NEW_TOKENS + 1, "max_tokens"),
    ("params", {"max_tokens": 100_000, "logprobs": 20}, "params"),
    ("params.temperature", -0.01, "temperature"),
    ("params.temperature", 2.01, "temperature"),
    ("params.temperature", 3, "temperature"),
    ("params.temperature", "0.5", "temperature"),
    ("params.temperature", True, "temperature"),
    ("params.temperature", float("nan"), "temperature"),
    ("params.temperature", float("inf"), "temperature"),
    ("params.temperature", None, "temperature"),
    ("params.top_p", 0, "top_p"),
    ("params.top_p", 0.0, "top_p"),
    ("params.top_p", -0.5, "top_p"),
    ("params.top_p", 1.0001, "top_p"),
    ("params.top_p", "1", "top_p"),
    ("params.top_p", False, "top_p"),
    ("params.top_k", 1.5, "top_k"),
    ("params.top_k", 40.0, "top_k"),
    ("params.top_k", "40", "top_k"),
    ("params.top_k", True, "top_k"),
    ("params.top_k", -2, "top_k"),
    ("params.seed", 1.0, "seed"),
    ("params.seed", "7", "seed"),
    ("params.seed", True, "seed"),
    ("params.seed", -1, "seed"),
    ("params.seed", 2**63, "seed"),
    ("params.stop", "\n", "stop"),
    ("params.stop", [1], "stop"),
    ("params.stop", [b"\n"], "stop"),
    ("params.stop", [["\n"]], "stop"),
    ("params.stop", [""], "stop"),
    ("params.stop", ["x"] * 17, "stop"),
    ("params.stop", {"a": "b"}, "stop"),
    ("params.beam", 2, "beam"),
    ("deadline", "tomorrow", "deadline"),
    ("deadline", True, "deadline"),
    ("deadline", -1.0, "deadline"),
    ("deadline", float("nan"), "deadline"),
    ("deadline", float("inf"), "deadline"),
    ("deadline", [1.0], "deadline"),
    ("priority", 1, "priority"),
    ("params.logprobs", -1, "logprobs"),
    ("params.logprobs", 21, "logprobs"),
    ("params.logprobs", True, "logprobs"),
    ("params.logprobs", 1.0, "logprobs"),
    ("params.presence_penalty", -2.01, "presence_penalty"),
    ("params.presence_penalty", 2.5, "presence_penalty"),
    ("params.presence_penalty", "0", "presence_penalty"),
    ("params.frequency_penalty", 3, "frequency_penalty"),
    ("params.frequency_penalty", float("nan"), "frequency_penalty"),
    ("params.response_format", "json_object", "response_format"),
    ("params.response_format", {"type": "text"}, "response_format"),
    ("params.response_format", {"type": "json_object", "schema": {}}, "schema"),
    ("params.response_format", {"type": "json_schema"}, "json_schema"),
    ("params.response_format", json_schema_format([]), "schema"),
    ("params.response_format", json_schema_format({"a": b"bin"}), "JSON cannot"),
    ("params.response_format", json_schema_format({"a": "x" * 16 * 1024}), "16384"),
    ("params.response_format", json_schema_format(nested(33)), "nested deeper"),
    ("params.response_format", json_schema_format({}, name="a b"), "name"),
    ("params.response_format", json_schema_format({}, extra=1), "extra"),
    ("messages", [{"role": "user", "content": "x"}], "exactly one"),
]

# (bad messages, what the error must name), on a job with no prompt
MESSAGES_REJECTS = [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "user", "content": "x"}] * 257, "messages"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "content"),
    ([{"role": "user", "content": "x", "name": "bob"}], "name"),
    ([{"role": "user", "content": "x" * (256 * 1024 + 1)}], "content"),
    ([{"role": "user", "content": "x" * (128 * 1024)}] * 3, "characters"),
]


@pytest.mark.parametrize(("value", "field"), MESSAGES_REJECTS)
def test_job_rejects_bad_messages(value: Any, field: str) -> None:
    rejects(Job, changed(chat_job(), "messages", value), field)


@pytest.mark.parametrize(("path", "value", "field"), JOB_REJECTS)
def test_job_rejects(path: str, value: Any, field: str) -> None:
    rejects(Job, changed(job(), path, value), field)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("prompt_token_ids", [], "prompt_token_ids"),
        ("prompt_token_ids", [-1], "prompt_token_ids"),
        ("prompt_token_ids", [2**31], "prompt_token_ids"),
        ("prompt_token_ids", [1.0], "prompt_token_ids"),
        ("prompt_token_ids", [True], "prompt_token_ids"),
        ("prompt_token_ids", ["1"], "prompt_token_ids"),
        ("prompt_token_ids", "1 2 3", "prompt_token_ids"),
        ("prompt_token_ids", [1] * (128 * 1024 + 1), "prompt_token_ids"),
    ],
)
def test_job_rejects_bad_token_ids(path: str, value: Any, field: str) -> None:
    payload = changed(changed(job(), "prompt", DELETE), path, value)
    rejects(Job, payload, field)


def test_job_rejects_both_and_neither_prompt() -> None:
    both = changed(job(), "prompt_token_ids", [1])
    neither = changed(job(), "prompt", DELETE)
    assert "exactly one" in str(rejects(Job, both, "prompt_token_ids"))
    assert "exactly one" in str(rejects(Job, neither, "prompt_token_ids"))
    chat_and_tokens = changed(chat_job(), "prompt_token_ids", [1])
    assert "exactly one" in str(rejects(Job, chat_and_tokens, "messages"))
    rejects(Job, changed(job(), "prompt", None), "prompt_token_ids")


RESULT_REJECTS = [
    ("job_id", "bad id", "job_id"),
    ("node_id", "AB" * 32, "node_id"),
    ("node_id", "ab" * 31, "node_id"),
    ("node_id", DELETE, "node_id"),
    ("model", DELETE, "model"),
    ("model.id", "a.b", "model.id"),
    ("model.version", "", "model.version"),
    ("model.sha256", "0" * 63, "model.sha256"),
    ("model.sha256", SHA.upper(), "model.sha256"),
    ("model.extra", 1, "model.extra"),
    ("runtime.image", "", "runtime.image"),
    ("runtime.engine", DELETE, "runtime.engine"),
    ("runtime.engine_version", 1, "runtime.engine_version"),
    ("runtime.device", "", "runtime.device"),
    ("config_version", -1, "config_version"),
    ("config_version", 1.0, "config_version"),
    ("config_version", True, "config_version"),
    ("input_sha256", "xyz", "input_sha256"),
    ("output.text", None, "output.text"),
    ("output.token_ids", [-1], "output.token_ids"),
    ("output.token_ids", ["1"], "output.token_ids"),
    ("output.finish_reason", "eos", "output.finish_reason"),
    ("output.finish_reason", DELETE, "output.finish_reason"),
    ("usage.prompt_tokens", -1, "usage.prompt_tokens"),
    ("usage.completion_tokens", "2", "usage.completion_tokens"),
    ("usage.cost", 1, "usage.cost"),
    ("attempt", 0, "attempt"),
    ("attempt", True, "attempt"),
    ("started_at", "now", "started_at"),
    ("finished_at", float("nan"), "finished_at"),
    ("finished_at", DELETE, "finished_at"),
    ("signature", b"x", "signature"),
]


@pytest.mark.parametrize(("path", "value", "field"), RESULT_REJECTS)
def test_result_body_rejects(path: str, value: Any, field: str) -> None:
    rejects(ResultBody, changed(result_body(), path, value), field)


ERROR_REJECTS = [
    ("node_id", "node-1", "node_id"),
    ("code", "TIMEOUT", "code"),
    ("code", "bad_request", "code"),
    ("code", 1, "code"),
    ("message", None, "message"),
    ("message", "x" * 2049, "message"),
    ("retryable", 1, "retryable"),
    ("retryable", "false", "retryable"),
    ("retryable", DELETE, "retryable"),
    ("at", DELETE, "at"),
    ("at", "yesterday", "at"),
    ("at", float("inf"), "at"),
    ("job_id", "a/b", "job_id"),
    ("attempt", 0, "attempt"),
    ("attempt", 1.5, "attempt"),
    ("stack", "trace", "stack"),
]


@pytest.mark.parametrize(("path", "value", "field"), ERROR_REJECTS)
def test_error_event_rejects(path: str, value: Any, field: str) -> None:
    rejects(ErrorEvent, changed(error_event(), path, value), field)


LIFECYCLE_REJECTS = [
    ("node_id", DELETE, "node_id"),
    ("kind", "crashed", "kind"),
    ("kind", "STARTED", "kind"),
    ("kind", DELETE, "kind"),
    ("at", True, "at"),
    ("details", ["a"], "details"),
    ("details", {1: "a"}, "details"),
    ("level", "info", "level"),
]


@pytest.mark.parametrize(("path", "value", "field"), LIFECYCLE_REJECTS)
def test_lifecycle_event_rejects(path: str, value: Any, field: str) -> None:
    payload = changed(lifecycle_event(), path, value)
    if path == "details" and isinstance(value, dict):
        # an int key is not even msgpack with string keys: the codec rejects it first
        with pytest.raises(SchemaError, match="map key"):
            decode(LifecycleEvent, packed(payload))
        return
    rejects(LifecycleEvent, payload, field)


SNAPSHOT_REJECTS = [
    ("version", 0, "version"),
    ("version", -3, "version"),
    ("version", 1.0, "version"),
    ("version", "2", "version"),
    ("version", True, "version"),
    ("version", DELETE, "version"),
    ("issued_at", DELETE, "issued_at"),
    ("issued_at", "2024", "issued_at"),
    ("runtime", DELETE, "runtime"),
    ("runtime.name", "", "runtime.name"),
    ("runtime.engine", "vLLM", "runtime.engine"),
    ("runtime.engine", "", "runtime.engine"),
    ("runtime.engine_args", [], "runtime.engine_args"),
    ("runtime.image", "rst/runtime-cpu:latest", "runtime"),
    ("runtime.image", "rst/runtime-cpu", "runtime"),
    ("runtime.image", "rst/runtime@sha256:" + "ab" * 31, "runtime"),
    ("runtime.image", "rst/runtime@sha256:" + "AB" * 32, "runtime"),
    ("runtime.image", "Rst/runtime@sha256:" + "ab" * 32, "runtime"),
    ("runtime.image", "sha256:" + "ab" * 31, "runtime"),
    ("runtime.image", "sha512:" + "ab" * 32, "runtime"),
    ("runtime.image", "", "runtime"),
    ("runtime.image", "x" * 513, "runtime.image"),
    ("runtime.gpus", True, "runtime.gpus"),
    ("models", [], "models"),
    ("models", DELETE, "models"),
    ("models", [model_spec()] * 65, "models"),
    ("models", {"tiny": model_spec()}, "models"),
    ("models.0.id", "", "models.0.id"),
    ("models.0.id", "a.b", "models.0.id"),
    ("models.0.version", "", "models.0.version"),
    ("models.0.version", "v" * 65, "models.0.version"),
    ("models.0.sha256", SHA[:-1], "models.0.sha256"),
    ("models.0.sha256", SHA.upper(), "models.0.sha256"),
    ("models.0.sha256", "g" * 64, "models.0.sha256"),
    ("models.0.sha256", bytes.fromhex(SHA), "models.0.sha256"),
    ("models.0.size", 0, "models.0.size"),
    ("models.0.size", -1, "models.0.size"),
    ("models.0.size", 1.5, "models.0.size"),
    ("models.0.size", "1234", "models.0.size"),
    ("models.0.size", 2**40 + 1, "models.0.size"),
    ("models.0.source", "http://models.example/tiny", "models.0.source"),
    ("models.0.source", "file:///etc/passwd", "models.0.source"),
    ("models.0.source", "nats-object:///tiny", "models.0.source"),
    ("models.0.source", "nats-object://rst models/tiny", "models.0.source"),
    ("models.0.source", "nats-object://rst_models/", "models.0.source"),
    ("models.0.source", "https://", "models.0.source"),
    ("models.0.source", "https://a b", "models.0.source"),
    ("models.0.source", "s3://bucket/tiny", "models.0.source"),
    ("models.0.source", "https://x/" + "a" * 2048, "models.0.source"),
    ("models.0.url", "https://x", "models.0.url"),
    ("models.0.validation", "none", "models.0.validation"),
    ("models.0.validation", [vector()] * 33, "models.0.validation"),
    ("models.0.validation.0.expected_sha256", DELETE, "expected_sha256"),
    ("models.0.validation.0.expected_sha256", "00", "expected_sha256"),
    ("models.0.validation.0.prompt", "both", "prompt"),
    ("models.0.validation.0.prompt_token_ids", [], "prompt_token_ids"),
    ("models.0.validation.0.params", {"max_tokens": 0}, "max_tokens"),
    ("models.0.validation.0.job_id", "j", "job_id"),
    ("signature", "x", "signature"),
]


@pytest.mark.parametrize(("path", "value", "field"), SNAPSHOT_REJECTS)
def test_snapshot_rejects(path: str, value: Any, field: str) -> None:
    rejects(Snapshot, changed(snapshot(), path, value), field)


def test_snapshot_rejects_unpinned_image_with_a_clear_message() -> None:
    error = rejects(Snapshot, changed(snapshot(), "runtime.image", "rst/x:latest"), "runtime")
    assert "pinned" in str(error)


def test_snapshot_rejects_duplicate_model_ids() -> None:
    payload = snapshot()
    payload["models"][1]["id"] = payload["models"][0]["id"]
    assert "unique" in str(rejects(Snapshot, payload, "model ids"))


def test_snapshot_picks_the_named_or_first_model() -> None:
    snap = decode(Snapshot, packed(snapshot()))
    first = snap.model(None)
    assert first is not None and first.id == "tiny"
    other = snap.model("other")
    assert other is not None and other.id == "other"
    assert snap.model("missing") is None


def test_vector_needs_exactly_one_prompt() -> None:
    rejects(ValidationVector, changed(vector(), "prompt", "also"), "prompt_token_ids")
    rejects(ValidationVector, changed(vector(), "prompt_token_ids", DELETE), "prompt_token_ids")


def test_payload_models_are_frozen() -> None:
    decoded = decode(Job, packed(job()))
    with pytest.raises(ValueError):
        decoded.job_id = "other"  # type: ignore[misc]


def test_node_id_constant_is_valid() -> None:
    assert len(NODE_ID) == 64
    assert IMAGE_DIGEST.endswith("ef" * 32)


def test_the_most_tokens_a_job_may_ask_for_fit_a_frame_and_a_result() -> None:
    """`MAX_NEW_TOKENS` is derived, not chosen: that many token ids fit one `done` frame's
    array and one result envelope; a job at the bound is valid, one past it is not."""
    assert MAX_NEW_TOKENS <= frames.MAX_ARRAY_LEN
    assert MAX_NEW_TOKENS * TOKEN_ID_BYTES <= MAX_ENVELOPE_BYTES - RESULT_RESERVED_BYTES
    Params(max_tokens=MAX_NEW_TOKENS)
    packed = frames.pack(
        frames.done(
            1,
            token_ids=[MAX_TOKEN_ID] * MAX_NEW_TOKENS,
            text="",
            finish_reason="length",
            prompt_tokens=1,
            first_token_s=0.0,
        )
    )
    assert frames.FrameDecoder(frames.TO_AGENT).feed(packed)[0]["t"] == "done"
