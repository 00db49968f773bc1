"""Bounds of a job's input, shared by the job schema (agent side, pydantic) and the runtime's
request parser (`schemas.frames.parse_request_item`, msgpack and the standard library only),
so a request is held to one set of rules on both sides of the frame pipe."""

import math
from collections.abc import Mapping
from typing import Any

import msgpack

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
MODEL_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

MAX_PROMPT_CHARS = 256 * 1024
"""Characters of a `prompt`, and of all `messages`' contents together."""
MAX_PROMPT_TOKENS = 128 * 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOKEN_ID = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1
MAX_TOP_K = 1 << 20
MAX_MESSAGES = 256
MESSAGE_ROLES = ("system", "user", "assistant")
MAX_LOGPROBS = 20
"""Alternatives per generated token that `params.logprobs` may ask for."""
MAX_PENALTY = 2
"""`presence_penalty` and `frequency_penalty` lie within [-MAX_PENALTY, MAX_PENALTY]."""
RESPONSE_FORMATS = ("json_object", "json_schema")
SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SCHEMA_DESCRIPTION_CHARS = 1024
MAX_SCHEMA_BYTES = 16 * 1024
"""A `json_schema` schema's size, msgpack-encoded."""
MAX_SCHEMA_DEPTH = 32
"""Nesting of a `json_schema` schema: each map or list is one level."""
DEFAULT_MAX_TOKENS = 16
"""What an engine generates for a job whose params give no `max_tokens` (see
`max_tokens`, the one place that applies it)."""

# -- what one job's output may be: what a final frame and a result envelope can carry ----

MAX_FRAME_BYTES = 8 << 20
"""The largest runtime frame (the default of `runtime_max_frame_bytes`)."""
MAX_FRAME_ARRAY_LEN = MAX_PROMPT_TOKENS + 1024
"""The longest array a runtime frame may hold: a prompt's or an output's token ids."""
MAX_ENVELOPE_BYTES = 1 << 20
"""The largest signed envelope a reader decodes (`schemas.codec`), as NATS's default
`max_payload`: a result must fit it."""
TOKEN_ID_BYTES = 5
"""A token id up to `MAX_TOKEN_ID`, msgpack-encoded: what each output token costs at
least, in a `done` frame and in a result."""
RESULT_RESERVED_BYTES = 16 << 10
"""A result envelope's bytes besides its output tokens (ids, refs, usage, key, signature)."""
MAX_NEW_TOKENS = min(
    MAX_FRAME_ARRAY_LEN, (MAX_ENVELOPE_BYTES - RESULT_RESERVED_BYTES) // TOKEN_ID_BYTES
)
"""The most tokens one job may ask for: as many token ids as one `done` frame's array and
one result envelope can hold. A job asking for more is refused when admitted
(`BAD_REQUEST`); before this bound (2^20) such a job broke every runtime that ran it."""
LOGPROB_TOKEN_BYTES = 40
"""A `done` frame's logprob entry for one token, without its alternatives (msgpack)."""
LOGPROB_PAIR_BYTES = 15
"""One `[token_id, logprob]` alternative, msgpack-encoded (an int and a float64); a
token has up to `logprobs` + 1 of them (the chosen one may be among them or not)."""
MAX_LOGPROB_BYTES = MAX_ENVELOPE_BYTES - RESULT_RESERVED_BYTES
"""What one job's logprobs may take in its `done` frame: no more than a result can carry."""


def max_tokens(params: Mapping[str, Any]) -> int:
    """How many tokens a job's params let the engine generate (the one place the default
    is applied, on both sides of the frame pipe)."""
    value = params.get("max_tokens")
    return DEFAULT_MAX_TOKENS if value is None else int(value)


def check_output_fits(tokens: int, logprobs: int | None) -> None:
    """Raise `ValueError` unless the output of `tokens` tokens, with `logprobs`
    alternatives per token, fits one `done` frame (the rule of the job schema and of the
    runtime's request parser)."""
    if tokens > MAX_NEW_TOKENS:
        raise ValueError(
            f"max_tokens is {tokens}, the limit is {MAX_NEW_TOKENS} (what one result can carry)"
        )
    if logprobs is None:
        return
    per_token = LOGPROB_TOKEN_BYTES + (logprobs + 1) * LOGPROB_PAIR_BYTES
    if tokens * per_token > MAX_LOGPROB_BYTES:
        most = MAX_LOGPROB_BYTES // per_token
        raise ValueError(
            f"max_tokens {tokens} with logprobs {logprobs} is more output than one result "
            f"can carry: at most {most} tokens with {logprobs} logprobs"
        )


def _json_depth(value: Any, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("schema keys must be strings")
            _json_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _json_depth(item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("schema numbers must be finite")
    elif not (value is None or isinstance(value, bool | int | str)):
        raise ValueError(f"schema holds a {type(value).__name__}, which JSON cannot")


def check_json_schema(schema: Any) -> None:
    """Raise `ValueError` unless `schema` is a map JSON can hold, within the depth and size
    bounds (the rule of both the job schema and the runtime's request parser)."""
    if not isinstance(schema, dict):
        raise ValueError("schema must be a map")
    _json_depth(schema, 0)
    size = len(msgpack.packb(schema, use_bin_type=True))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"schema is {size} bytes encoded, the limit is {MAX_SCHEMA_BYTES}")
