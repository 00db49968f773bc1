"""Partial output of a streaming job (PROTOCOL.md, v2 "Partial output")."""

from typing import Annotated

from pydantic import Field, StrictInt, StrictStr

from schemas.job import JobId, TokenId, Wire
from schemas.result import FinishReason, Network, NodeId


class StreamBody(Wire):
    """Body of a signed `stream` envelope on `rst.stream.<job_id>` (core NATS, not stored).

    `seq` counts 0, 1, 2, ... within one attempt; the last message of an attempt carries
    `finish_reason`. The attempt's `token_ids` concatenate to the signed result's."""

    job_id: JobId
    node_id: NodeId
    network: Network
    attempt: Annotated[StrictInt, Field(ge=1)]
    seq: Annotated[StrictInt, Field(ge=0)]
    token_ids: list[TokenId]
    text: StrictStr
    finish_reason: FinishReason | None = None


class CancelRequest(Wire):
    """Body of a cancel on `rst.cancel.<job_id>` (core NATS, unsigned)."""

    job_id: JobId
