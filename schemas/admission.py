"""Admitted nodes (PROTOCOL.md, "Admitted nodes"): the authority's signed record of one node
in the registry bucket, key = the node id. A revocation is a record too."""

from typing import Annotated

from pydantic import Field, StrictBool, StrictFloat

from schemas.job import ModelId, Wire
from schemas.result import Network, NodeId


class Admission(Wire):
    """Body of a signed `admission` envelope (signed by an authority key)."""

    node_id: NodeId
    network: Network
    admitted_at: StrictFloat
    """When the authority admitted the node (or, on a revocation, first admitted it)."""
    expires_at: StrictFloat | None = None
    """After this, the node counts as not admitted."""
    models: Annotated[list[ModelId], Field(max_length=256)] | None = None
    """The models the node may serve; absent: any model of the snapshot in force."""
    revoked: StrictBool = False
    revoked_at: StrictFloat | None = None

    def admits(self, network: str, now: float, model: str | None = None) -> bool:
        """Whether this record lets its node serve `network` (and `model`) at `now`."""
        if self.revoked or self.network != network:
            return False
        if self.expires_at is not None and now >= self.expires_at:
            return False
        return model is None or self.models is None or model in self.models
