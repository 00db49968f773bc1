"""Bounds of a job's input, shared by the job schema (agent side, pydantic) and the runtime's
request parser (`schemas.frames.parse_request_item`, standard library only), so a request is
held to one set of rules on both sides of the frame pipe."""

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
MODEL_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

MAX_PROMPT_CHARS = 256 * 1024
MAX_PROMPT_TOKENS = 128 * 1024
MAX_NEW_TOKENS = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOKEN_ID = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1
MAX_TOP_K = 1 << 20
MAX_MESSAGES = 256
MESSAGE_ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 16
"""What an engine generates for a job whose params give no `max_tokens`."""
