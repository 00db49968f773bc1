"""Configuration snapshots: the approved runtime and models (PROTOCOL.md, "Configuration").

`engine_args` reach the engine's constructor, so only the keys listed per engine in
`ENGINE_ARGS` pass, with scalar values: a snapshot can tune the engine, never point it at
another model, tokenizer, download directory or remote code (the engine loads the mounted,
verified model and nothing else).
"""

import re
from typing import Annotated, Self

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from schemas.job import ModelId, Number, Prompted, Wire
from schemas.result import ClassName, Network, Sha256

IMAGE_DIGEST_PATTERN = r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$"
IMAGE_ID_PATTERN = r"^sha256:[0-9a-f]{64}$"
SOURCE_PATTERN = r"^(nats-object://[A-Za-z0-9_-]+/[^\s]+|https://[^\s]+)$"
MAX_MODELS = 64
MAX_VECTORS = 32
MAX_ENGINE_ARGS = 32
MAX_CLASSES = 16

ENGINE_ARGS: dict[str, frozenset[str]] = {
    "echo": frozenset({"token_delay_ms", "max_active", "fault"}),
    "vllm": frozenset(
        {
            "dtype",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "gpu_memory_utilization",
            "kv_cache_memory_bytes",
            "kv_cache_dtype",
            "block_size",
            "swap_space",
            "enforce_eager",
            "enable_prefix_caching",
            "enable_chunked_prefill",
            "tensor_parallel_size",
            "quantization",
            "seed",
        }
    ),
}
"""The `engine_args` keys each engine accepts; an engine not listed accepts none."""

EngineArg = Annotated[StrictStr, Field(max_length=128)] | StrictBool | StrictInt | StrictFloat


class ValidationVector(Prompted):
    """A known input and the SHA-256 of the msgpack encoding of its output `token_ids`."""

    expected_sha256: Sha256


class ModelSpec(Wire):
    id: ModelId
    version: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    sha256: Sha256
    size: Annotated[StrictInt, Field(ge=1, le=1 << 40)]
    source: Annotated[StrictStr, Field(pattern=SOURCE_PATTERN, max_length=2048)]
    validation: Annotated[list[ValidationVector], Field(max_length=MAX_VECTORS)] = []


class RuntimeSpec(Wire):
    name: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    image: Annotated[StrictStr, Field(max_length=512)]
    engine: Annotated[StrictStr, Field(pattern=r"^[a-z0-9_-]{1,32}$")]
    engine_args: Annotated[dict[StrictStr, EngineArg], Field(max_length=MAX_ENGINE_ARGS)] = {}

    @model_validator(mode="after")
    def _allowed_args(self) -> Self:
        allowed = ENGINE_ARGS.get(self.engine, frozenset())
        refused = sorted(set(self.engine_args) - allowed)
        if refused:
            raise ValueError(
                f"engine_args {refused} are not allowed for engine {self.engine!r} "
                f"(allowed: {sorted(allowed)})"
            )
        return self

    @model_validator(mode="after")
    def _pinned(self) -> Self:
        if not (
            re.fullmatch(IMAGE_DIGEST_PATTERN, self.image)
            or re.fullmatch(IMAGE_ID_PATTERN, self.image)
        ):
            raise ValueError(
                "runtime image must be pinned: 'name@sha256:<64 hex>' or 'sha256:<64 hex>'"
            )
        return self


Placement = Annotated[
    list[Annotated[StrictStr, Field(pattern=r"^(\*|[0-9a-f]{64})$")]],
    Field(max_length=1024),
]


class ExecutionClassSpec(Wire):
    """What nodes of one execution class run: their runtime, and validation vectors made on
    that class, per model id (a model not named keeps the vectors it carries)."""

    runtime: RuntimeSpec
    validation: Annotated[
        dict[ModelId, Annotated[list[ValidationVector], Field(max_length=MAX_VECTORS)]],
        Field(max_length=MAX_MODELS),
    ] = {}


class Snapshot(Wire):
    network: Network
    version: Annotated[StrictInt, Field(ge=1)]
    issued_at: Number
    runtime: RuntimeSpec
    models: Annotated[list[ModelSpec], Field(min_length=1, max_length=MAX_MODELS)]
    placement: Annotated[dict[ModelId, Placement], Field(max_length=MAX_MODELS)] = {}
    """Which nodes may serve a model (node ids, or `*` for any); a model not named here may
    be served by any node."""
    classes: (
        Annotated[dict[ClassName, ExecutionClassSpec], Field(max_length=MAX_CLASSES)] | None
    ) = None
    """Per execution class, its runtime and vectors; absent: `runtime` serves every node."""

    @model_validator(mode="after")
    def _unique_models(self) -> Self:
        ids = [m.id for m in self.models]
        if len(ids) != len(set(ids)):
            raise ValueError("model ids must be unique")
        return self

    def placed(self, model_id: str, node_id: str) -> bool:
        """Whether the placement lets `node_id` serve `model_id`."""
        nodes = self.placement.get(model_id)
        return nodes is None or "*" in nodes or node_id in nodes

    @model_validator(mode="after")
    def _classes_name_listed_models(self) -> Self:
        ids = {m.id for m in self.models}
        for name, entry in (self.classes or {}).items():
            unknown = sorted(set(entry.validation) - ids)
            if unknown:
                raise ValueError(f"class {name!r} has vectors for unlisted models {unknown}")
        return self

    def for_class(self, name: str) -> "Snapshot | None":
        """This snapshot as a node of class `name` applies it: the class's runtime and
        vectors in place of the defaults, or None when the snapshot has classes and `name`
        is not one. A snapshot without classes is the same for every class."""
        if self.classes is None:
            return self
        entry = self.classes.get(name)
        if entry is None:
            return None
        models = [
            m.model_copy(update={"validation": entry.validation[m.id]})
            if m.id in entry.validation
            else m
            for m in self.models
        ]
        return self.model_copy(update={"runtime": entry.runtime, "models": models, "classes": None})

    def model(self, model_id: str | None) -> ModelSpec | None:
        """The model a node serves: the one named, or else the first listed."""
        if model_id is None:
            return self.models[0]
        return next((m for m in self.models if m.id == model_id), None)
