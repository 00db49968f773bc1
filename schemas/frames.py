"""Runtime frames v2: the msgpack stream between the agent and the runtime container.

Imported inside the runtime image, so it depends on msgpack and the standard library only.
Each direction is a stream of msgpack maps with a kind key `t`:

    agent -> runtime   submit (one request), abort, ping, shutdown
    runtime -> agent   ready, partial, done, failed, pong, fatal

Requests are independent: the runtime answers each `submit` with `partial` frames while it
generates (streaming requests only, at most one per request per engine step), then exactly
one `done` or `failed`, in completion order. An `abort` for a running request ends it with
`failed` (code `aborted`); an abort for an id the runtime does not run is ignored. `ping` is
answered between engine steps, its `pong` carrying the engine's figures (`EngineStats`).
`shutdown` is the explicit end of input (closing stdin over Docker's attach API is not
reliable).

Both sides parse with the functions below, so a request item is validated by one set of
rules (the bounds of `schemas.limits`, the same as the job schema's). A value that is not a
map, an unknown `t`, a `t` or `id` of the wrong type, nesting deeper than `MAX_DEPTH` (a
submit's `response_format` schema is the job's JSON, bounded when its request is parsed), an
oversized frame or oversized container means the peer is broken: `FrameError`. A request
item that breaks the job schema's rules fails that request alone (`failed`, `bad_request`).
"""

import math
import re
from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict, cast

import msgpack

from schemas.limits import (
    MAX_FRAME_ARRAY_LEN,
    MAX_FRAME_BYTES,
    MAX_LOGPROBS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PENALTY,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DESCRIPTION_CHARS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    MESSAGE_ROLES,
    RESPONSE_FORMATS,
    SCHEMA_NAME_PATTERN,
    check_json_schema,
    check_output_fits,
    max_tokens,
)

PROTOCOL_VERSION = 2
MAX_ARRAY_LEN = MAX_FRAME_ARRAY_LEN
MAX_MAP_LEN = MAX_SCHEMA_BYTES // 2
"""A `response_format` schema within the job schema's size bound may hold maps this long."""
MAX_BIN_LEN = 1024
MAX_DEPTH = 8
"""Nesting of a frame, not counting inside a submit's `response_format` schema: user JSON,
bounded by the job schema's rule (`check_json_schema`) when the request is parsed."""
MAX_REASON_CHARS = 2000
MAX_FRAME_OBJECTS = 1 << 19
"""Values one frame may decode to (every element of every list and map, and the containers
themselves): what bounds a frame's decoding cost, since one byte of msgpack can make a
Python list. A `done` frame with the most tokens and logprobs a job may ask for
(`schemas.limits.check_output_fits`) holds fewer than 350k."""


class FrameError(ValueError):
    """The byte stream is not a valid frame sequence (garbage, oversized, unknown type), or a
    frame's content breaks the protocol."""


class FrameKind(StrEnum):
    SUBMIT = "submit"
    ABORT = "abort"
    PING = "ping"
    SHUTDOWN = "shutdown"
    READY = "ready"
    PARTIAL = "partial"
    DONE = "done"
    FAILED = "failed"
    PONG = "pong"
    FATAL = "fatal"


TO_RUNTIME = frozenset({FrameKind.SUBMIT, FrameKind.ABORT, FrameKind.PING, FrameKind.SHUTDOWN})
TO_AGENT = frozenset(
    {
        FrameKind.READY,
        FrameKind.PARTIAL,
        FrameKind.DONE,
        FrameKind.FAILED,
        FrameKind.PONG,
        FrameKind.FATAL,
    }
)


class FailCode(StrEnum):
    """Why the runtime failed one request (`failed` frame)."""

    BAD_REQUEST = "bad_request"  # the request cannot run on this engine/model
    ENGINE = "engine"  # the engine raised for this request
    ABORTED = "aborted"  # an `abort` frame stopped it
    DEADLINE = "deadline"  # its deadline passed while it ran


FinishReason = Literal["stop", "length"]
FINISH_REASONS = frozenset({"stop", "length"})

Frame = dict[str, Any]


# The request's parts as maps, the runtime's side of `schemas.job`'s models (`Message`,
# `Params`, `ResponseFormat`, `JsonSchemaSpec`): one set of rules, checked by the parsers
# below on this side and by pydantic on the other.


class MessageMap(TypedDict):
    role: str
    content: str


class JsonSchemaMap(TypedDict):
    name: str
    schema: dict[str, Any]
    description: NotRequired[str]
    strict: NotRequired[bool]


class ResponseFormatMap(TypedDict):
    """`{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {...}}`."""

    type: str
    json_schema: NotRequired[JsonSchemaMap]


class ParamsMap(TypedDict, total=False):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    logprobs: int
    presence_penalty: float
    frequency_penalty: float
    response_format: ResponseFormatMap


class RequestItem(TypedDict):
    """What the engine runs: exactly one of the three inputs, and the sampling params."""

    prompt: NotRequired[str]
    prompt_token_ids: NotRequired[list[int]]
    messages: NotRequired[list[MessageMap]]
    params: ParamsMap


class TokenLogprob(TypedDict):
    token_id: int
    logprob: float
    top: list[list[float]]


class DeviceInfo(TypedDict):
    """One accelerator the runtime sees (`ready.devices`)."""

    name: str
    uuid: str
    memory_bytes: int


MAX_DEVICES = 64


class ReadyFrame(TypedDict):
    t: Literal["ready"]
    proto: int
    engine: str
    engine_version: str
    model_sha256: str
    device: str
    max_active: int
    devices: list[DeviceInfo]
    """Every accelerator visible to the runtime; empty on CPU (optional on the wire)."""


class SubmitFrame(TypedDict):
    t: Literal["submit"]
    id: int
    request: RequestItem
    stream: bool
    deadline: float | None


class AbortFrame(TypedDict):
    t: Literal["abort"]
    id: int


class PingFrame(TypedDict):
    t: Literal["ping"]
    id: int


class EngineStats(TypedDict, total=False):
    """The engine's own figures at the time of a `pong` (each only where the engine has it):
    requests it runs and holds waiting, the share of its KV cache in use, and its prefix
    cache's lookups and hits in tokens since it started."""

    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int


class PongFrame(TypedDict):
    t: Literal["pong"]
    id: int
    stats: NotRequired[EngineStats]


class ShutdownFrame(TypedDict):
    t: Literal["shutdown"]


class PartialFrame(TypedDict):
    t: Literal["partial"]
    id: int
    token_ids: list[int]
    text: str


class DoneFrame(TypedDict):
    t: Literal["done"]
    id: int
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    first_token_s: float
    logprobs: NotRequired[list[TokenLogprob]]


class FailedFrame(TypedDict):
    t: Literal["failed"]
    id: int
    code: str
    reason: str


class FatalFrame(TypedDict):
    t: Literal["fatal"]
    message: str


# -- constructors ------------------------------------------------------------------------


def pack(frame: Any) -> bytes:
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


def ready(
    *,
    engine: str,
    engine_version: str,
    model_sha256: str,
    device: str,
    max_active: int,
    devices: list[DeviceInfo] | None = None,
) -> ReadyFrame:
    return {
        "t": "ready",
        "proto": PROTOCOL_VERSION,
        "engine": engine,
        "engine_version": engine_version,
        "model_sha256": model_sha256,
        "device": device,
        "max_active": max_active,
        "devices": list(devices or []),
    }


def submit(
    request_id: int, request: RequestItem, *, stream: bool = False, deadline: float | None = None
) -> SubmitFrame:
    return {
        "t": "submit",
        "id": request_id,
        "request": request,
        "stream": stream,
        "deadline": deadline,
    }


def abort(request_id: int) -> AbortFrame:
    return {"t": "abort", "id": request_id}


def partial(request_id: int, token_ids: list[int], text: str) -> PartialFrame:
    return {"t": "partial", "id": request_id, "token_ids": token_ids, "text": text}


def done(
    request_id: int,
    *,
    token_ids: list[int],
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    first_token_s: float,
    logprobs: list[TokenLogprob] | None = None,
) -> DoneFrame:
    frame: DoneFrame = {
        "t": "done",
        "id": request_id,
        "token_ids": token_ids,
        "text": text,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "first_token_s": first_token_s,
    }
    if logprobs is not None:
        frame["logprobs"] = logprobs
    return frame


def failed(request_id: int, code: FailCode, reason: str) -> FailedFrame:
    return {
        "t": "failed",
        "id": request_id,
        "code": code.value,
        "reason": reason[:MAX_REASON_CHARS],
    }


def ping(ping_id: int) -> PingFrame:
    return {"t": "ping", "id": ping_id}


def pong(ping_id: int, stats: EngineStats | None = None) -> PongFrame:
    frame: PongFrame = {"t": "pong", "id": ping_id}
    if stats is not None:
        frame["stats"] = stats
    return frame


def shutdown() -> ShutdownFrame:
    return {"t": "shutdown"}


def fatal(message: str) -> FatalFrame:
    return {"t": "fatal", "message": message[:MAX_REASON_CHARS]}


# -- field checks --------------------------------------------------------------------------


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FrameError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.60}")
    return value


def _num(value: Any, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise FrameError(f"{name} must be a finite number, got {value!r:.60}")
    if value > hi or value < lo or (open_lo and value == lo):
        raise FrameError(f"{name} must be within {'(' if open_lo else '['}{lo}, {hi}]")
    return float(value)


def _str(value: Any, name: str, *, max_len: int, min_len: int = 0) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise FrameError(f"{name} must be a string of {min_len}-{max_len} characters")
    return value


def _tokens(value: Any, name: str, *, min_len: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise FrameError(f"{name} must be a list of {min_len}-{max_len} token ids")
    for t in value:
        if type(t) is not int or not 0 <= t <= MAX_TOKEN_ID:
            raise FrameError(f"{name} holds {t!r:.40}, not a token id")
    return value


def _map(value: Any, name: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FrameError(f"{name} must be a map")
    extra = set(value) - allowed
    if extra:
        raise FrameError(f"{name} has unknown keys {sorted(extra)!r:.100}")
    return value


def _frame_id(frame: Frame) -> int:
    return _int(frame.get("id"), f"{frame.get('t')}.id", 0, (1 << 63) - 1)


PARAM_NAMES = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
    }
)
_ITEM = frozenset({"prompt", "prompt_token_ids", "messages", "params"})
_JSON_SCHEMA = frozenset({"name", "schema", "description", "strict"})


def _penalty(value: Any, key: str) -> float:
    return _num(value, f"params.{key}", -MAX_PENALTY, MAX_PENALTY)


def _response_format(value: Any) -> ResponseFormatMap:
    raw = _map(value, "params.response_format", frozenset({"type", "json_schema"}))
    kind = raw.get("type")
    if kind not in RESPONSE_FORMATS:
        raise FrameError(f"params.response_format.type must be one of {RESPONSE_FORMATS}")
    if kind == "json_object":
        if "json_schema" in raw:
            raise FrameError("params.response_format json_object takes no json_schema")
        return {"type": "json_object"}
    spec = _map(raw.get("json_schema"), "params.response_format.json_schema", _JSON_SCHEMA)
    name = spec.get("name")
    if not isinstance(name, str) or re.fullmatch(SCHEMA_NAME_PATTERN, name) is None:
        raise FrameError(
            f"params.response_format.json_schema.name must match {SCHEMA_NAME_PATTERN}"
        )
    schema = spec.get("schema")
    try:
        check_json_schema(schema)
    except ValueError as exc:
        raise FrameError(f"params.response_format.json_schema.schema: {exc}") from exc
    parsed: JsonSchemaMap = {"name": name, "schema": cast(dict[str, Any], schema)}
    if spec.get("description") is not None:
        parsed["description"] = _str(
            spec["description"],
            "params.response_format.json_schema.description",
            max_len=MAX_SCHEMA_DESCRIPTION_CHARS,
        )
    if spec.get("strict") is not None:
        if type(spec["strict"]) is not bool:
            raise FrameError("params.response_format.json_schema.strict must be a boolean")
        parsed["strict"] = spec["strict"]
    return {"type": "json_schema", "json_schema": parsed}


def parse_params(value: Any) -> ParamsMap:
    raw = _map({} if value is None else value, "params", PARAM_NAMES)
    params: ParamsMap = {}
    for key, item in raw.items():
        if item is None:
            continue
        if key == "max_tokens":
            params["max_tokens"] = _int(item, "params.max_tokens", 1, MAX_NEW_TOKENS)
        elif key == "temperature":
            params["temperature"] = _num(item, "params.temperature", 0, 2)
        elif key == "top_p":
            params["top_p"] = _num(item, "params.top_p", 0, 1, open_lo=True)
        elif key == "top_k":
            params["top_k"] = _int(item, "params.top_k", -1, MAX_TOP_K)
        elif key == "seed":
            params["seed"] = _int(item, "params.seed", 0, MAX_SEED)
        elif key == "stop":
            if not isinstance(item, list) or len(item) > MAX_STOP_STRINGS:
                raise FrameError(f"params.stop must be a list of at most {MAX_STOP_STRINGS}")
            params["stop"] = [
                _str(s, "params.stop[]", min_len=1, max_len=MAX_STOP_CHARS) for s in item
            ]
        elif key == "logprobs":
            params["logprobs"] = _int(item, "params.logprobs", 0, MAX_LOGPROBS)
        elif key == "presence_penalty":
            params["presence_penalty"] = _penalty(item, key)
        elif key == "frequency_penalty":
            params["frequency_penalty"] = _penalty(item, key)
        elif key == "response_format":
            params["response_format"] = _response_format(item)
    try:
        check_output_fits(max_tokens(params), params.get("logprobs"))
    except ValueError as exc:
        raise FrameError(f"params: {exc}") from exc
    return params


def parse_request_item(value: Any) -> RequestItem:
    """One request as the job schema bounds it: exactly one input, valid params."""
    raw = _map(value, "request", _ITEM)
    given = [k for k in ("prompt", "prompt_token_ids", "messages") if raw.get(k) is not None]
    if len(given) != 1:
        raise FrameError("exactly one of 'prompt', 'prompt_token_ids' and 'messages' is needed")
    item: RequestItem = {"params": parse_params(raw.get("params"))}
    if given[0] == "prompt":
        item["prompt"] = _str(raw["prompt"], "prompt", max_len=MAX_PROMPT_CHARS)
    elif given[0] == "prompt_token_ids":
        item["prompt_token_ids"] = _tokens(
            raw["prompt_token_ids"], "prompt_token_ids", min_len=1, max_len=MAX_PROMPT_TOKENS
        )
    else:
        messages = raw["messages"]
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
            raise FrameError(f"messages must be a list of 1-{MAX_MESSAGES} maps")
        parsed: list[MessageMap] = []
        for m in messages:
            m = _map(m, "messages[]", frozenset({"role", "content"}))
            if m.get("role") not in MESSAGE_ROLES:
                raise FrameError(f"messages[].role must be one of {MESSAGE_ROLES}")
            content = _str(m.get("content"), "messages[].content", max_len=MAX_PROMPT_CHARS)
            parsed.append({"role": m["role"], "content": content})
        chars = sum(len(m["content"]) for m in parsed)
        if chars > MAX_PROMPT_CHARS:
            raise FrameError(f"messages hold {chars} characters, the limit is {MAX_PROMPT_CHARS}")
        item["messages"] = parsed
    return item


def parse_submit(frame: Frame) -> SubmitFrame:
    """A `submit` frame whose id is valid; `request` is parsed separately (a bad request
    fails that request alone, a bad id breaks the protocol)."""
    _map(frame, "submit", frozenset({"t", "id", "request", "stream", "deadline"}))
    request_id = _frame_id(frame)
    stream = frame.get("stream", False)
    if type(stream) is not bool:
        raise FrameError("submit.stream must be a boolean")
    deadline = frame.get("deadline")
    if deadline is not None:
        deadline = _num(deadline, "submit.deadline", 0, math.inf)
    return {
        "t": "submit",
        "id": request_id,
        "request": frame.get("request"),  # type: ignore[typeddict-item]
        "stream": stream,
        "deadline": deadline,
    }


def parse_abort(frame: Frame) -> AbortFrame:
    return {"t": "abort", "id": _frame_id(frame)}


def parse_ping(frame: Frame) -> PingFrame:
    return {"t": "ping", "id": _frame_id(frame)}


MAX_STAT_COUNT = 1 << 62
_STATS = frozenset(EngineStats.__annotations__)


def parse_engine_stats(value: Any) -> EngineStats:
    raw = _map(value, "pong.stats", _STATS)
    stats: EngineStats = {}
    if raw.get("running") is not None:
        stats["running"] = _int(raw["running"], "pong.stats.running", 0, 1 << 20)
    if raw.get("waiting") is not None:
        stats["waiting"] = _int(raw["waiting"], "pong.stats.waiting", 0, 1 << 20)
    if raw.get("kv_cache_usage") is not None:
        stats["kv_cache_usage"] = _num(raw["kv_cache_usage"], "pong.stats.kv_cache_usage", 0, 1)
    if raw.get("prefix_cache_queries") is not None:
        stats["prefix_cache_queries"] = _int(
            raw["prefix_cache_queries"], "pong.stats.prefix_cache_queries", 0, MAX_STAT_COUNT
        )
    if raw.get("prefix_cache_hits") is not None:
        stats["prefix_cache_hits"] = _int(
            raw["prefix_cache_hits"], "pong.stats.prefix_cache_hits", 0, MAX_STAT_COUNT
        )
    return stats


def parse_pong(frame: Frame) -> PongFrame:
    parsed: PongFrame = {"t": "pong", "id": _frame_id(frame)}
    if frame.get("stats") is not None:
        parsed["stats"] = parse_engine_stats(frame["stats"])
    return parsed


def parse_ready(frame: Frame) -> ReadyFrame:
    """Raises `FrameError` for a missing or mistyped field; the version is checked by the
    caller (it has the better message)."""
    proto = frame.get("proto")
    if type(proto) is not int:
        raise FrameError(f"ready.proto must be an integer, got {proto!r:.40}")
    fields = {}
    for name in ("engine", "engine_version", "model_sha256", "device"):
        fields[name] = _str(frame.get(name), f"ready.{name}", max_len=512)
    max_active = frame.get("max_active", 0)
    return {
        "t": "ready",
        "proto": proto,
        "engine": fields["engine"],
        "engine_version": fields["engine_version"],
        "model_sha256": fields["model_sha256"],
        "device": fields["device"],
        "max_active": _int(max_active, "ready.max_active", 0, 1 << 20),
        "devices": _devices(frame.get("devices", [])),
    }


def _devices(value: Any) -> list[DeviceInfo]:
    if type(value) is not list or len(value) > MAX_DEVICES:
        raise FrameError(f"ready.devices must be a list of at most {MAX_DEVICES} devices")
    devices: list[DeviceInfo] = []
    for item in value:
        if type(item) is not dict:
            raise FrameError("ready.devices holds a non-map")
        devices.append(
            {
                "name": _str(item.get("name"), "ready.devices.name", min_len=1, max_len=128),
                "uuid": _str(item.get("uuid"), "ready.devices.uuid", max_len=128),
                "memory_bytes": _int(
                    item.get("memory_bytes"), "ready.devices.memory_bytes", 0, 1 << 60
                ),
            }
        )
    return devices


def parse_partial(frame: Frame) -> PartialFrame:
    return {
        "t": "partial",
        "id": _frame_id(frame),
        "token_ids": _tokens(
            frame.get("token_ids"), "partial.token_ids", min_len=0, max_len=MAX_ARRAY_LEN
        ),
        "text": _str(frame.get("text"), "partial.text", max_len=MAX_FRAME_BYTES),
    }


def _logprobs(value: Any) -> list[TokenLogprob]:
    if not isinstance(value, list):
        raise FrameError("done.logprobs must be a list")
    out: list[TokenLogprob] = []
    for entry in value:
        entry = _map(entry, "done.logprobs[]", frozenset({"token_id", "logprob", "top"}))
        top = entry.get("top", [])
        if not isinstance(top, list):
            raise FrameError("done.logprobs[].top must be a list")
        pairs: list[list[float]] = []
        for pair in top:
            if not isinstance(pair, list) or len(pair) != 2:
                raise FrameError("done.logprobs[].top holds a non-pair")
            pairs.append(
                [
                    _int(pair[0], "top token id", 0, MAX_TOKEN_ID),
                    _num(pair[1], "top logprob", -math.inf, 0),
                ]
            )
        out.append(
            {
                "token_id": _int(entry.get("token_id"), "logprobs.token_id", 0, MAX_TOKEN_ID),
                "logprob": _num(entry.get("logprob"), "logprobs.logprob", -math.inf, 0),
                "top": pairs,
            }
        )
    return out


def parse_done(frame: Frame) -> DoneFrame:
    finish = frame.get("finish_reason")
    if finish not in FINISH_REASONS:
        raise FrameError(f"done.finish_reason is {finish!r:.40}")
    result = done(
        _frame_id(frame),
        token_ids=_tokens(
            frame.get("token_ids"), "done.token_ids", min_len=0, max_len=MAX_ARRAY_LEN
        ),
        text=_str(frame.get("text"), "done.text", max_len=MAX_FRAME_BYTES),
        finish_reason=cast(str, finish),
        prompt_tokens=_int(frame.get("prompt_tokens"), "done.prompt_tokens", 0, 1 << 40),
        first_token_s=_num(frame.get("first_token_s", 0.0), "done.first_token_s", 0, 1e9),
        logprobs=_logprobs(frame["logprobs"]) if frame.get("logprobs") is not None else None,
    )
    return result


def parse_failed(frame: Frame) -> FailedFrame:
    code = frame.get("code")
    if code not in FailCode.__members__.values():
        raise FrameError(f"failed.code is {code!r:.40}")
    return {
        "t": "failed",
        "id": _frame_id(frame),
        "code": cast(str, code),
        "reason": _str(frame.get("reason"), "failed.reason", max_len=MAX_FRAME_BYTES),
    }


def parse_fatal(frame: Frame) -> FatalFrame:
    message = frame.get("message")
    return {"t": "fatal", "message": str(message)[:MAX_REASON_CHARS]}


# -- decoding ------------------------------------------------------------------------------


def _depth_ok(value: Any, depth: int, exempt: Any = None) -> bool:
    """Whether `value` nests at most MAX_DEPTH maps and arrays (`exempt`: one value not
    checked, a submit's JSON schema). Decoded msgpack holds exact dicts and lists: only
    those are walked, so long lists of scalars (token ids) cost one type check each."""
    if value is exempt:
        return True
    kind = type(value)
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:
        return True
    if depth >= MAX_DEPTH:
        return False
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and not _depth_ok(child, depth + 1, exempt):
            return False
    return True


def _schema_in(frame: Frame) -> Any:
    """A submit frame's `response_format` schema, if it has one where a schema goes."""
    try:
        schema = frame["request"]["params"]["response_format"]["json_schema"]["schema"]
    except (KeyError, TypeError, IndexError):
        return None
    return schema if isinstance(schema, dict | list) else None


_SAFE_REPR = re.compile(r"[^\x20-\x7e]")


class _TooManyObjects(Exception):
    pass


def _not_msgpack(exc: Exception) -> FrameError:
    return FrameError(f"not a msgpack frame ({type(exc).__name__}: {exc})")


class FrameDecoder:
    """Incremental decoder: `feed()` bytes as they arrive, get complete frames back.

    A frame's bytes are counted before it is decoded: a scanner that builds nothing finds
    where each frame ends, and a frame over `max_frame_bytes` is refused whole, however its
    bytes are spread. A complete frame is then decoded at once, refusing any container
    longer than the protocol needs and stopping after `MAX_FRAME_OBJECTS` values, so no
    frame costs more than a bounded amount of memory and time; maps use string keys only;
    nesting is bounded."""

    def __init__(self, allowed: frozenset[str], *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._allowed = allowed
        self._max = max_frame_bytes
        self._scanner = msgpack.Unpacker(max_buffer_size=max_frame_bytes)
        self._unpacker = msgpack.Unpacker(max_buffer_size=max_frame_bytes, **self._limits())
        """Decodes the complete frames too small to need counting (see `_split`)."""
        self._pending = bytearray()
        """The bytes of the frames not decoded yet: the scanner's stream from `_offset` on."""
        self._offset = 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        step = max(1, self._max // 2)
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            try:
                self._scanner.feed(chunk)
            except msgpack.BufferFull as exc:
                raise FrameError(f"frame larger than {self._max} bytes") from exc
            self._pending += chunk
            self._split(frames)
            if len(self._pending) > self._max:
                raise FrameError(f"frame larger than {self._max} bytes")
        return frames

    def _split(self, frames: list[Frame]) -> None:
        """Decode every complete frame in `_pending`, then drop their bytes (once: a read
        may hold hundreds of small frames)."""
        head = 0
        unpacker = self._unpacker
        try:
            with memoryview(self._pending) as pending:
                while True:
                    try:
                        self._scanner.skip()
                    except msgpack.OutOfData:
                        return
                    except Exception as exc:
                        raise _not_msgpack(exc) from exc
                    end = self._scanner.tell() - self._offset
                    if end - head > self._max:
                        raise FrameError(f"frame larger than {self._max} bytes")
                    if end - head <= MAX_FRAME_OBJECTS:
                        # Too small to hold more values than allowed (a value takes a
                        # byte at least): no count needed.
                        unpacker.feed(pending[head:end])
                        value = unpacker.unpack()
                    else:
                        value = self._decode_counted(pending[head:end])
                    frames.append(self._check(value))
                    head = end
        except FrameError:
            raise
        except UnicodeDecodeError as exc:
            raise FrameError("frame holds a string that is not UTF-8") from exc
        except Exception as exc:
            raise _not_msgpack(exc) from exc
        finally:
            del self._pending[:head]
            self._offset += head

    def _limits(self) -> dict[str, Any]:
        return {
            "raw": False,
            "strict_map_key": True,
            "max_str_len": self._max,
            "max_bin_len": MAX_BIN_LEN,
            "max_array_len": MAX_ARRAY_LEN,
            "max_map_len": MAX_MAP_LEN,
            "max_ext_len": 0,
        }

    def _decode_counted(self, data: memoryview) -> Any:
        """A frame large enough to hold more than `MAX_FRAME_OBJECTS` values, counted as
        it decodes and stopped there."""
        budget = MAX_FRAME_OBJECTS

        def counted(container: Any) -> Any:
            nonlocal budget
            budget -= len(container) + 1
            if budget < 0:
                raise _TooManyObjects
            return container

        # Released on the way out, also when refused: the traceback keeps this frame, and
        # a view still held would stop the caller from dropping the bytes decoded.
        with data:
            try:
                return msgpack.unpackb(
                    data, list_hook=counted, object_hook=counted, **self._limits()
                )
            except _TooManyObjects as exc:
                raise FrameError(f"frame holds more than {MAX_FRAME_OBJECTS} values") from exc

    def _check(self, value: Any) -> Frame:
        if not isinstance(value, dict):
            shown = _SAFE_REPR.sub("?", repr(value)[:60])
            raise FrameError(f"expected a frame map, got {type(value).__name__}: {shown}")
        kind = value.get("t")
        if not isinstance(kind, str) or kind not in self._allowed:
            shown = _SAFE_REPR.sub("?", repr(kind)[:40])
            raise FrameError(f"unexpected frame type {shown}")
        if "id" in value and type(value["id"]) is not int:
            raise FrameError(f"{kind}.id must be an integer")
        exempt = _schema_in(value) if kind == FrameKind.SUBMIT else None
        if not _depth_ok(value, 0, exempt):
            raise FrameError(f"{kind} frame nested deeper than {MAX_DEPTH}")
        return value
