"""Error and lifecycle events (PROTOCOL.md, "Error and lifecycle events")."""

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt, StrictStr

from schemas.job import JobId, Number, Wire
from schemas.result import Network, NodeId

MAX_MESSAGE_CHARS = 2048


class ErrorCode(StrEnum):
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RUNTIME_FAILURE = "RUNTIME_FAILURE"
    OUTPUT_MALFORMED = "OUTPUT_MALFORMED"
    MODEL_INVALID = "MODEL_INVALID"
    CONFIG_REJECTED = "CONFIG_REJECTED"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"


class LifecycleKind(StrEnum):
    STARTED = "started"
    CONFIG_APPLIED = "config_applied"
    MODEL_READY = "model_ready"
    MODEL_REMOVED = "model_removed"
    RUNTIME_STARTED = "runtime_started"
    RUNTIME_REPLACED = "runtime_replaced"
    VALIDATION_PASSED = "validation_passed"
    MODEL_STATE = "model_state"
    STOPPING = "stopping"


class ErrorEvent(Wire):
    node_id: NodeId
    network: Network
    code: ErrorCode
    message: Annotated[StrictStr, Field(max_length=MAX_MESSAGE_CHARS)]
    retryable: StrictBool
    at: Number
    job_id: JobId | None = None
    attempt: Annotated[StrictInt, Field(ge=1)] | None = None


class LifecycleEvent(Wire):
    node_id: NodeId
    network: Network
    kind: LifecycleKind
    at: Number
    details: dict[str, Any] = {}
