"""Bounded msgpack decoding of untrusted payloads into pydantic models."""

from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from schemas.errors import SchemaError
from schemas.limits import MAX_ENVELOPE_BYTES

DEFAULT_MAX_BYTES = MAX_ENVELOPE_BYTES

M = TypeVar("M", bound=BaseModel)


class _DuplicateKey(ValueError):
    pass


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """msgpack's `object_pairs_hook`: a map that names a key twice is refused (a plain
    decoder keeps the last value, another implementation may keep the first, so two
    readers of one signed body could disagree on what it says)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def unpack_map(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Decode one msgpack map with string keys, none of them twice in any map; anything
    else is a `SchemaError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SchemaError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SchemaError(f"payload is {len(data)} bytes, the limit is {max_bytes}")
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=_unique_map
        )
    except _DuplicateKey as exc:
        raise SchemaError(f"duplicate map key {exc.args[0]!r:.60}") from exc
    except msgpack.ExtraData as exc:
        raise SchemaError("trailing bytes after the msgpack map") from exc
    except UnicodeDecodeError as exc:
        raise SchemaError(f"a string is not valid UTF-8 ({exc.reason})") from exc
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(value, dict):
        raise SchemaError(f"expected a msgpack map, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SchemaError(f"map keys must be strings, got {type(key).__name__} {key!r:.40}")
    return value


def describe(exc: ValidationError) -> str:
    """One line naming each failing field and why, for error events and logs."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def validate(model: type[M], value: Any) -> M:
    """Validate an already decoded value, mapping pydantic's error to `SchemaError`."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise SchemaError(describe(exc)) from exc
    except RecursionError as exc:
        raise SchemaError("payload is nested too deeply") from exc


def decode(model: type[M], data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Decode untrusted msgpack bytes into `model`; raises only `SchemaError`."""
    return validate(model, unpack_map(data, max_bytes=max_bytes))


def packer() -> Callable[[Any], bytes]:
    """msgpack encoding without a new packer per call, for one thread's use only."""
    pack_one: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
    return pack_one


def encode(payload: BaseModel) -> bytes:
    """The msgpack encoding of a payload, omitting unset optional fields."""
    packed: bytes = msgpack.packb(payload.model_dump(mode="json", exclude_none=True))
    return packed
