"""Result bodies: what a node signs and publishes for a job (PROTOCOL.md, "Results")."""

from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from schemas.job import JobId, ModelId, Number, TokenId, Wire

SHA256_PATTERN = r"^[0-9a-f]{64}$"
NODE_ID_PATTERN = r"^[0-9a-f]{64}$"
NETWORK_PATTERN = r"^[a-z0-9-]{1,64}$"

Sha256 = Annotated[StrictStr, Field(pattern=SHA256_PATTERN)]
NodeId = Annotated[StrictStr, Field(pattern=NODE_ID_PATTERN)]
Network = Annotated[StrictStr, Field(pattern=NETWORK_PATTERN)]
"""The network a node belongs to (PROTOCOL.md, "Network identity")."""
CLASS_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
ClassName = Annotated[StrictStr, Field(pattern=CLASS_PATTERN)]
"""An execution class: hardware and number format, e.g. `cpu-fp32`, `nvidia-hopper-bf16`
(PROTOCOL.md, "Execution classes")."""
Count = Annotated[StrictInt, Field(ge=0)]
FinishReason = Literal["stop", "length"]


class ModelRef(Wire):
    id: ModelId
    version: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    sha256: Sha256


class DeviceRef(Wire):
    """One accelerator the runtime ran on."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    uuid: Annotated[StrictStr, Field(max_length=128)]
    memory_bytes: Count


class RuntimeRef(Wire):
    """The execution class within which results are reproducible."""

    image: Annotated[StrictStr, Field(min_length=1, max_length=512)]
    engine: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    engine_version: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    device: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    devices: Annotated[list[DeviceRef], Field(max_length=64)] | None = None
    """Every accelerator the runtime saw (name, UUID, memory); absent on CPU."""
    execution_class: ClassName | None = None
    """The node's execution class, whose snapshot entry (if any) it applied."""


MAX_TOP_LOGPROBS = 20


class TokenLogprob(Wire):
    """One generated token's logprob, and the most likely alternatives as
    `[token_id, logprob]` pairs."""

    token_id: TokenId
    logprob: Number
    top: Annotated[list[tuple[TokenId, Number]], Field(max_length=MAX_TOP_LOGPROBS + 1)] = []


class Output(Wire):
    text: StrictStr
    token_ids: list[TokenId]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None


class Usage(Wire):
    prompt_tokens: Count
    completion_tokens: Count
    first_token_s: Annotated[Number, Field(ge=0)] | None = None
    """Seconds from the job's start on the engine to its first token."""


class ResultBody(Wire):
    job_id: JobId
    node_id: NodeId
    network: Network
    model: ModelRef
    runtime: RuntimeRef
    config_version: Annotated[StrictInt, Field(ge=0)]
    input_sha256: Sha256
    output: Output
    usage: Usage
    attempt: Annotated[StrictInt, Field(ge=1)]
    started_at: Number
    finished_at: Number
