"""Validation vectors: run a model's known inputs and compare the hash of its output tokens.

A vector's `expected_sha256` is the SHA-256 of `msgpack.packb(token_ids)` (PROTOCOL.md,
"Configuration snapshots"). A model is served only while its vectors pass.
"""

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack

from schemas.frames import RequestItem
from schemas.snapshot import ModelSpec, ValidationVector
from worker.core.errors import ModelInvalid, NodeError, RuntimeFailure
from worker.runtime.api import Completion, Runtime, WorkItem

log = logging.getLogger(__name__)


def token_ids_sha256(token_ids: Sequence[int]) -> str:
    """The `expected_sha256` of a vector whose output is `token_ids` (for authoring snapshots)."""
    return hashlib.sha256(msgpack.packb(list(token_ids))).hexdigest()


def vector_payload(vector: ValidationVector) -> RequestItem:
    """The work item's request for a vector: prompt or token ids, and params without unset
    keys."""
    return vector.request_item()


@dataclass(frozen=True, slots=True)
class VectorFailure:
    index: int
    expected_sha256: str
    got_sha256: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class ValidationReport:
    model_id: str
    model_version: str
    model_sha256: str
    total: int
    failures: list[VectorFailure] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        what = f"model {self.model_id} {self.model_version}"
        if self.passed:
            return f"{what}: {self.total} validation vectors passed"
        first = self.failures[0]
        return (
            f"{what}: {len(self.failures)} of {self.total} validation vectors failed; "
            f"vector {first.index}: {first.detail}"
        )


async def run_vectors(runtime: Runtime, spec: ModelSpec) -> ValidationReport:
    """Run the spec's vectors as one batch and report each mismatch.

    A retryable `RuntimeFailure` from the runtime as a whole propagates (the runtime broke;
    that is not the model's fault); per-item errors count as failures.
    """
    vectors = spec.validation
    items = [
        WorkItem(job_id=f"validation-{spec.id}-{i}", request=vector_payload(v))
        for i, v in enumerate(vectors)
    ]
    outcomes = await runtime.run(items) if items else []
    failures: list[VectorFailure] = []
    if len(outcomes) != len(items):
        failures.append(
            VectorFailure(
                -1, "", None, f"runtime returned {len(outcomes)} of {len(items)} outcomes"
            )
        )
    for i, (vector, outcome) in enumerate(zip(vectors, outcomes, strict=False)):
        if isinstance(outcome, RuntimeFailure) and outcome.retryable:
            raise outcome  # the supervisor reports a broken runtime per item
        if isinstance(outcome, NodeError):
            failures.append(
                VectorFailure(i, vector.expected_sha256, None, f"runtime error: {outcome}")
            )
            continue
        assert isinstance(outcome, Completion)
        got = token_ids_sha256(outcome.token_ids)
        if got != vector.expected_sha256:
            failures.append(
                VectorFailure(
                    i,
                    vector.expected_sha256,
                    got,
                    f"output token_ids hash {got}, expected {vector.expected_sha256} "
                    f"({len(outcome.token_ids)} tokens, finish_reason={outcome.finish_reason})",
                )
            )
    report = ValidationReport(spec.id, spec.version, spec.sha256, len(vectors), failures)
    if report.passed:
        log.info("validation_passed model=%s vectors=%d", spec.id, len(vectors))
    else:
        log.error("validation_failed model=%s detail=%s", spec.id, report.summary())
    return report


async def validate_model(runtime: Runtime, spec: ModelSpec) -> ValidationReport:
    """`run_vectors`, raising `ModelInvalid` (with the report's summary) if any vector fails."""
    report = await run_vectors(runtime, spec)
    if not report.passed:
        raise ModelInvalid(report.summary())
    return report
