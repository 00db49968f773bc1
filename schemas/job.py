"""Jobs: what the network asks a node to run (PROTOCOL.md, "Jobs" and "v2 additions")."""

from typing import Annotated, Any, Literal, Self, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from schemas.frames import ParamsMap, RequestItem
from schemas.limits import (
    JOB_ID_PATTERN,
    MAX_LOGPROBS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PENALTY,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_SCHEMA_DESCRIPTION_CHARS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    SCHEMA_NAME_PATTERN,
    check_json_schema,
    check_output_fits,
    max_tokens,
)
from schemas.limits import MODEL_ID_PATTERN as MODEL_ID_PATTERN

JobId = Annotated[StrictStr, Field(pattern=JOB_ID_PATTERN)]
ModelId = Annotated[StrictStr, Field(pattern=MODEL_ID_PATTERN)]
TokenId = Annotated[StrictInt, Field(ge=0, lt=MAX_TOKEN_ID + 1)]
Number = StrictFloat | StrictInt


class Wire(BaseModel):
    """Base of every payload: unknown keys are rejected; fields use strict types, never coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Penalty = Annotated[Number, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class JsonSchemaSpec(Wire):
    """A named JSON Schema the output must satisfy (OpenAI's `json_schema` shape)."""

    name: Annotated[StrictStr, Field(pattern=SCHEMA_NAME_PATTERN)]
    schema_: Annotated[dict[StrictStr, Any], Field(alias="schema")]
    description: Annotated[StrictStr, Field(max_length=MAX_SCHEMA_DESCRIPTION_CHARS)] | None = None
    strict: StrictBool | None = None

    model_config = ConfigDict(serialize_by_alias=True)

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_json_schema(value)
        return value


class JsonObjectFormat(Wire):
    """Output is any JSON object."""

    type: Literal["json_object"]


class JsonSchemaFormat(Wire):
    """Output is JSON valid against `json_schema.schema`."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class Message(Wire):
    """One chat turn, rendered by the model's own chat template on the node."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]


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
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _output_fits(self) -> Self:
        check_output_fits(max_tokens({"max_tokens": self.max_tokens}), self.logprobs)
        return self


class Prompted(Wire):
    """Exactly one of a text prompt, a list of token ids and chat messages, plus sampling
    parameters."""

    prompt: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    prompt_token_ids: (
        Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None
    ) = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    params: Params = Params()

    @model_validator(mode="after")
    def _one_prompt(self) -> Self:
        given = [x is not None for x in (self.prompt, self.prompt_token_ids, self.messages)]
        if sum(given) != 1:
            raise ValueError(
                "exactly one of 'prompt', 'prompt_token_ids' and 'messages' must be given"
            )
        if self.messages is not None:
            chars = sum(len(m.content) for m in self.messages)
            if chars > MAX_PROMPT_CHARS:
                raise ValueError(
                    f"messages hold {chars} characters, the limit is {MAX_PROMPT_CHARS}"
                )
        return self

    def request_item(self) -> RequestItem:
        """The request as the runtime takes it (a `submit` frame's `request` map): its
        prompt, token ids or messages, and its parameters, unset ones left out."""
        item: RequestItem = {
            "params": cast(ParamsMap, self.params.model_dump(exclude_none=True, by_alias=True))
        }
        if self.prompt is not None:
            item["prompt"] = self.prompt
        elif self.prompt_token_ids is not None:
            item["prompt_token_ids"] = self.prompt_token_ids
        elif self.messages is not None:
            item["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return item


class Job(Prompted):
    """A job body as published to `rst.jobs.<model_id>` (plain msgpack, unsigned)."""

    job_id: JobId
    model_id: ModelId
    deadline: Annotated[Number, Field(ge=0)] | None = None
    stream: StrictBool = False
