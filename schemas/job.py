"""Jobs: what the network asks a node to run (PROTOCOL.md, "Jobs")."""

from typing import Annotated, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from schemas.limits import (
    JOB_ID_PATTERN,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    MODEL_ID_PATTERN,
)

JobId = Annotated[StrictStr, Field(pattern=JOB_ID_PATTERN)]
ModelId = Annotated[StrictStr, Field(pattern=MODEL_ID_PATTERN)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=MAX_TOKEN_ID + 1)]
Number = StrictFloat | StrictInt


class Wire(BaseModel):
    """Base of every payload: unknown keys are rejected; fields use strict types, never coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Params(Wire):
    """Sampling parameters; a missing `temperature` means greedy decoding."""

    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 0
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=MAX_SEED + 1)] | None = None
    stop: (
        Annotated[
            list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(max_length=MAX_STOP_STRINGS),
        ]
        | None
    ) = None


class Prompted(Wire):
    """Exactly one of a text prompt and a list of token ids, plus sampling parameters."""

    prompt: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    prompt_token_ids: (
        Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None
    ) = None
    params: Params = Params()

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of 'prompt' and 'prompt_token_ids' must be given")
        return self


class Job(Prompted):
    """A job body as published to `rst.jobs.<model_id>` (plain msgpack, unsigned)."""

    job_id: JobId
    model_id: ModelId
    deadline: Annotated[Number, Field(ge=0)] | None = None
    stream: StrictBool = False
