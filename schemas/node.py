"""What a node says about itself: the heartbeat and the status reply (PROTOCOL.md, "What this
node adds where the contract is silent")."""

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr

from schemas.job import Number, Wire
from schemas.result import Count, ModelRef, Network, NodeId


class NodeState(StrEnum):
    NEW = "new"
    STARTING = "starting"
    WAITING_CONFIG = "waiting_config"
    APPLYING = "applying"  # switching what runs: nothing is served meanwhile
    SERVING = "serving"
    OUT_OF_SERVICE = "out_of_service"
    STOPPING = "stopping"
    CLOSED = "closed"


class ValidationState(StrEnum):
    """Where the served model's validation vectors stand."""

    NONE = "none"  # no model yet
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"  # MODEL_INVALID: out of service
    NOT_RUN = "not_run"  # the runtime broke before the vectors could run


class ModelState(StrEnum):
    """Where one approved model stands on this node (PROTOCOL.md, "Model states")."""

    PENDING = "pending"  # approved, not verified in the cache yet
    READY = "ready"  # verified in the cache, not loaded (inactive)
    ACTIVE = "active"  # loaded in the runtime and served
    FAILED = "failed"  # its bytes, archive or vectors failed (`reason`); retried with backoff
    REMOVED = "removed"  # no longer approved: deleted from the cache


class ModelStatus(ModelRef):
    """One model of the node and its state."""

    state: ModelState
    reason: Annotated[StrictStr, Field(max_length=512)] | None = None


class NodeStatus(Wire):
    """The node's state, as the heartbeat's `details` and the status reply carry it."""

    state: NodeState
    uptime_s: Annotated[Number, Field(ge=0)]
    config_version: Annotated[StrictInt, Field(ge=1)] | None = None
    model: ModelRef | None = None
    validation: ValidationState
    runtime: dict[StrictStr, Any]
    models: Annotated[list[ModelStatus], Field(max_length=256)] = []
    pipeline: Annotated[StrictStr, Field(max_length=32)] | None = None
    in_flight: Count
    completed: Count


class Heartbeat(Wire):
    """Signed (`typ` = `event`), core NATS on `<prefix>.nodes.<node_id>.heartbeat`."""

    node_id: NodeId
    network: Network
    kind: Literal["heartbeat"] = "heartbeat"
    at: Number
    details: NodeStatus


class StatusReply(NodeStatus):
    """Plain msgpack, the answer to a request on `<prefix>.nodes.<node_id>.status`."""

    node_id: NodeId
    network: Network
