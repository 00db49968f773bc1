"""Bounds of a job's input, shared by the job schema (agent side, pydantic) and the runtime's
request parser (`schemas.frames.parse_request_item`, msgpack and the standard library only),
so a request is held to one set of rules on both sides of the frame pipe."""

import math
from typing import Any

import msgpack

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
MODEL_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

MAX_PROMPT_CHARS = 256 * 1024
"""Characters of a `prompt`, and of all `messages`' contents together."""
MAX_PROMPT_TOKENS = 128 * 1024
MAX_NEW_TOKENS = 1 << 20
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
"""What an engine generates for a job whose params give no `max_tokens`."""


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
