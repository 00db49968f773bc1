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


class NodeStatus(Wire):
    """The node's state, as the heartbeat's `details` and the status reply carry it."""

    state: NodeState
    uptime_s: Annotated[Number, Field(ge=0)]
    config_version: Annotated[StrictInt, Field(ge=1)] | None = None
    model: ModelRef | None = None
    validation: ValidationState
    runtime: dict[StrictStr, Any]
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
