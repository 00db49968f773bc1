"""What a node says about itself: the heartbeat and the status reply (PROTOCOL.md, "What this
node adds where the contract is silent")."""

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from schemas.job import Number, Wire
from schemas.result import Count, ModelRef, Network, NodeId, Sha256

Text = Annotated[StrictStr, Field(max_length=256)]
Bytes = Annotated[StrictInt, Field(ge=0)]
Ratio = Annotated[Number, Field(ge=0, le=1)]
MAX_GPUS = 64
MAX_FLAGS = 32


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


class Software(Wire):
    """What the node runs: its agent, and the engine and image of its runtime (None
    before a runtime has become ready)."""

    agent_version: Text
    engine: Text | None = None
    engine_version: Text | None = None
    runtime_image: Annotated[StrictStr, Field(max_length=512)] | None = None


class Cpu(Wire):
    model: Text
    cores: Annotated[StrictInt, Field(ge=1)]


class Memory(Wire):
    total_bytes: Bytes
    available_bytes: Bytes


class Disk(Wire):
    """The model cache's file system."""

    total_bytes: Bytes
    free_bytes: Bytes


class Gpu(Wire):
    """One GPU as NVML reports it; a figure NVML cannot give on this device is None."""

    index: Annotated[StrictInt, Field(ge=0, lt=MAX_GPUS)]
    uuid: Text
    name: Text
    memory_total_bytes: Bytes
    memory_used_bytes: Bytes
    driver_version: Text
    cuda_version: Text | None = None
    temperature_celsius: Annotated[Number, Field(ge=-100, le=300)] | None = None
    utilization_ratio: Ratio | None = None
    power_watts: Annotated[Number, Field(ge=0, le=100_000)] | None = None
    power_limit_watts: Annotated[Number, Field(ge=0, le=100_000)] | None = None
    ecc_errors_corrected: Count | None = None
    """Volatile (since the driver loaded); None where ECC is off or unsupported."""
    ecc_errors_uncorrected: Count | None = None
    throttle_reasons: Annotated[list[Text], Field(max_length=MAX_FLAGS)] = []
    """Why the clocks are held down now (NVML's clock event reasons, e.g. `hw_slowdown`,
    `sw_thermal_slowdown`); `gpu_idle` and `applications_clocks_setting` are left out."""


class Hardware(Wire):
    """What the node runs on: read once at start, except the figures that move (memory
    available, disk free, and each GPU's memory used, temperature, utilisation, power,
    ECC errors and throttle reasons), sampled on their own cadence."""

    cpu: Cpu
    memory: Memory
    disk: Disk
    gpus: Annotated[list[Gpu], Field(max_length=MAX_GPUS)] = []
    """Empty on a machine without NVIDIA GPUs (or without the `gpu` extra)."""
    sampled_at: Number


class RuntimeHealth(Wire):
    """The runtime as the supervisor sees it, and its engine's own figures (from the last
    `pong`; None before the first or where the engine has no such figure)."""

    restarts: Count
    ping_rtt_ms: Annotated[Number, Field(ge=0)] | None = None
    running: Count = 0
    """Requests in the engine now (the agent's count of requests it submitted)."""
    waiting: Count = 0
    """Requests the engine holds but does not run yet (its scheduler's queue)."""
    kv_cache_usage: Ratio | None = None
    prefix_cache_hit_rate: Ratio | None = None


class NodeStatus(Wire):
    """The node's state, as the heartbeat's `details` and the status reply carry it."""

    state: NodeState
    uptime_s: Annotated[Number, Field(ge=0)]
    config_version: Annotated[StrictInt, Field(ge=1)] | None = None
    config_hash: Sha256 | None = None
    """SHA-256 of the signed snapshot envelope in force (exact bytes, hex)."""
    model: ModelRef | None = None
    validation: ValidationState
    software: Software | None = None
    hardware: Hardware | None = None
    health: RuntimeHealth | None = None
    runtime: dict[StrictStr, Any]
    models: Annotated[list[ModelStatus], Field(max_length=256)] = []
    pipeline: Annotated[StrictStr, Field(max_length=32)] | None = None
    in_flight: Count
    completed: Count
    admitted: StrictBool | None = None
    """Whether the node registry admits this node (None: not checked yet, or not required)."""


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
    last_heartbeat_at: Number | None = None
    """When the node last published its heartbeat (None: not yet)."""
