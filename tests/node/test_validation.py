"""Validation vectors through a stub runtime at the `Runtime` seam; image pinning on Docker."""

import hashlib
import subprocess
from typing import Any

import msgpack
import pytest

from schemas.snapshot import ModelSpec
from worker.core.errors import ImageUnavailable, ItemFailed, ModelInvalid, RuntimeEnded
from worker.node.validation import run_vectors, token_ids_sha256, validate_model, vector_payload
from worker.runtime.api import Completion, ItemOutcome, RuntimeFacts, WorkItem
from worker.runtime.imagepin import ensure_image


class StubRuntime:
    """Answers each prompt with the token ids `outputs` maps it to."""

    def __init__(self, outputs: dict[str, list[int]], fail: frozenset[str] = frozenset()) -> None:
        self.outputs = outputs
        self.fail = fail
        self.batches: list[list[WorkItem]] = []

    @property
    def facts(self) -> RuntimeFacts:
        return RuntimeFacts("stub", "0", "b" * 64, "cpu", "sha256:" + "a" * 64)

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        self.batches.append(items)
        out: list[ItemOutcome] = []
        for item in items:
            key = item.request.get("prompt") or str(item.request.get("prompt_token_ids"))
            if key in self.fail:
                out.append(ItemFailed("engine error"))
                continue
            ids = self.outputs[key]
            out.append(Completion(item.job_id, "text", ids, "length", 3))
        return out


def spec(vectors: list[dict[str, Any]]) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "id": "m1",
            "version": "1",
            "sha256": "b" * 64,
            "size": 1,
            "source": "nats-object://rst_models/m1",
            "validation": vectors,
        }
    )


def test_expected_hash_is_sha256_of_msgpack_token_ids() -> None:
    assert token_ids_sha256([1, 2, 3]) == hashlib.sha256(msgpack.packb([1, 2, 3])).hexdigest()


def test_payload_drops_unset_fields() -> None:
    s = spec([{"prompt": "hi", "params": {"max_tokens": 4}, "expected_sha256": "0" * 64}])
    assert vector_payload(s.validation[0]) == {
        "prompt": "hi",
        "params": {"max_tokens": 4, "temperature": 0},
    }


async def test_vectors_pass_in_one_batch() -> None:
    runtime = StubRuntime({"hi": [5, 6], "[1, 2]": [7]})
    s = spec(
        [
            {"prompt": "hi", "params": {"seed": 1}, "expected_sha256": token_ids_sha256([5, 6])},
            {"prompt_token_ids": [1, 2], "expected_sha256": token_ids_sha256([7])},
        ]
    )
    report = await validate_model(runtime, s)
    assert report.passed and report.total == 2
    assert len(runtime.batches) == 1 and len(runtime.batches[0]) == 2


async def test_mismatch_and_item_error_fail_with_details() -> None:
    runtime = StubRuntime({"hi": [5, 6], "bye": [1]}, fail=frozenset({"bye"}))
    s = spec(
        [
            {"prompt": "hi", "expected_sha256": token_ids_sha256([5, 7])},
            {"prompt": "bye", "expected_sha256": token_ids_sha256([1])},
        ]
    )
    report = await run_vectors(runtime, s)
    assert not report.passed
    assert [f.index for f in report.failures] == [0, 1]
    assert report.failures[0].got_sha256 == token_ids_sha256([5, 6])
    assert "runtime error" in report.failures[1].detail
    with pytest.raises(ModelInvalid, match="2 of 2 validation vectors failed; vector 0"):
        await validate_model(runtime, s)


class CrashingRuntime(StubRuntime):
    """The supervisor's view of a runtime that died mid-batch: retryable, per item."""

    async def run(self, items: list[WorkItem]) -> list[ItemOutcome]:
        return [RuntimeEnded("runtime exited with code 137") for _ in items]


async def test_a_broken_runtime_is_not_an_invalid_model() -> None:
    s = spec([{"prompt": "hi", "expected_sha256": token_ids_sha256([5, 6])}])
    with pytest.raises(RuntimeEnded):
        await validate_model(CrashingRuntime({}), s)


@pytest.mark.docker
async def test_image_pinned_by_local_id(docker_client: Any) -> None:
    subprocess.run(
        "tar -c --files-from /dev/null | docker import - rst-empty:latest",
        shell=True,
        check=True,
        capture_output=True,
    )
    image_id = docker_client.images.get("rst-empty:latest").id
    assert await ensure_image(docker_client, image_id) == image_id
    with pytest.raises(ImageUnavailable, match="not loaded on this node"):
        await ensure_image(docker_client, "sha256:" + "0" * 64)
    with pytest.raises(ImageUnavailable, match="not pinned"):
        await ensure_image(docker_client, "rst-empty:latest")
