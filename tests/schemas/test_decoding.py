"""Decoding untrusted bytes: only `SchemaError` ever escapes, and it says what is wrong."""

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.codec import DEFAULT_MAX_BYTES, decode, unpack_map
from schemas.envelope import unpack_envelope
from schemas.errors import SchemaError
from schemas.event import ErrorEvent, LifecycleEvent
from schemas.job import Job, Params
from schemas.result import ResultBody
from schemas.snapshot import ModelSpec, RuntimeSpec, Snapshot, ValidationVector
from tests.support.payloads import error_event, job, lifecycle_event, result_body, snapshot

MODELS: list[type[BaseModel]] = [
    Job,
    Params,
    ResultBody,
    ErrorEvent,
    LifecycleEvent,
    Snapshot,
    ModelSpec,
    RuntimeSpec,
    ValidationVector,
]


def packed(payload: Any) -> bytes:
    data: bytes = msgpack.packb(payload, use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x81\xa1a", "not valid msgpack"),
        (packed([1, 2]), "expected a msgpack map, got list"),
        (packed("job"), "expected a msgpack map, got str"),
        (packed(7), "expected a msgpack map, got int"),
        (packed(None), "expected a msgpack map, got NoneType"),
        (packed(b"\x81"), "expected a msgpack map, got bytes"),
        (packed(msgpack.ExtType(5, b"x")), "expected a msgpack map, got ExtType"),
        (packed({1: "a"}), "not valid msgpack"),
        (packed({b"job_id": "a"}), "map keys must be strings"),
        (packed({"a": 1}) + b"\x00", "trailing bytes"),
        (packed({"a": 1}) * 2, "trailing bytes"),
        (b"\x81\xa1a\xa2\xff\xfe", "UTF-8"),
        (b"\x81\xa2\xc3\x28\x01", "UTF-8"),
        (b"\xdf\xff\xff\xff\xff", "not valid msgpack"),
        (b"\x91" * 5000 + b"\x90", "not valid msgpack"),
    ],
    ids=lambda value: value[:12].hex() if isinstance(value, bytes) else None,
)
def test_wire_level_garbage(data: bytes, fragment: str) -> None:
    for model in (Job, Snapshot):
        with pytest.raises(SchemaError, match=fragment):
            decode(model, data)


def test_non_bytes_input() -> None:
    with pytest.raises(SchemaError, match="expected bytes, got str"):
        unpack_map("{}")  # type: ignore[arg-type]


def test_oversize_payload_is_rejected_before_decoding() -> None:
    big = job()
    big["prompt"] = "x" * 100
    data = packed(big)
    assert decode(Job, data, max_bytes=len(data)).job_id == big["job_id"]
    with pytest.raises(SchemaError, match=f"limit is {len(data) - 1}"):
        decode(Job, data, max_bytes=len(data) - 1)
    huge = packed({"job_id": "a", "model_id": "m", "prompt": "x" * DEFAULT_MAX_BYTES})
    with pytest.raises(SchemaError, match="the limit is 1048576"):
        decode(Job, huge)


def test_deeply_nested_payloads() -> None:
    deep = b"\x84\xa6job_id\xa1a\xa8model_id\xa1m\xa6prompt\xa1x\xa6params" + b"\x91" * 100_000
    with pytest.raises(SchemaError, match="not valid msgpack"):
        decode(Job, deep + b"\x90")
    details = b"\x84\xa7node_id\xd9\x40" + b"a" * 64 + b"\xa4kind\xa7started\xa2at\x01"
    nested_maps = details + b"\xa7details" + b"\x81\xa1k" * 50_000 + b"\xc0"
    with pytest.raises(SchemaError):
        decode(LifecycleEvent, nested_maps)
    # nesting that msgpack accepts is still validated
    shallow = packed(
        {
            "node_id": "a" * 64,
            "network": "devnet",
            "kind": "started",
            "at": 1,
            "details": {"k": [[[[{"x": 1}]]]]},
        }
    )
    assert decode(LifecycleEvent, shallow).details == {"k": [[[[{"x": 1}]]]]}


def test_schema_error_names_field_and_rule() -> None:
    bad = job()
    bad["params"]["top_p"] = 0
    with pytest.raises(SchemaError) as info:
        decode(Job, packed(bad))
    assert str(info.value) == "params.top_p: Input should be greater than 0"
    assert isinstance(info.value, ValueError)


# Random msgpack values, including maps shaped like the real payloads with random leaves.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), children, max_size=5)
    ),
    max_leaves=30,
)
KEYS = sorted(
    {k for p in (job(), result_body(), error_event(), lifecycle_event(), snapshot()) for k in p}
    | {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "v", "typ", "body"}
)
shaped = st.dictionaries(st.sampled_from(KEYS), values, max_size=12)


def mutate(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(sorted(base)), values, max_size=4).map(
        lambda over: base | over
    )


def decode_only_schema_errors(data: bytes) -> None:
    for model in MODELS:
        try:
            decode(model, data)
        except SchemaError as exc:
            assert str(exc)
    try:
        unpack_envelope(data)
    except SchemaError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_schema_error(data: bytes) -> None:
    decode_only_schema_errors(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values | shaped)
def test_random_msgpack_raises_only_schema_error(value: Any) -> None:
    decode_only_schema_errors(packed(value))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutate(job())
    | mutate(result_body())
    | mutate(error_event())
    | mutate(lifecycle_event())
    | mutate(snapshot())
)
def test_mutated_payloads_raise_only_schema_error(value: dict[str, Any]) -> None:
    decode_only_schema_errors(packed(value))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0))
def test_corrupted_valid_payloads_raise_only_schema_error(junk: bytes, where: int) -> None:
    data = packed(snapshot())
    cut = where % len(data)
    decode_only_schema_errors(data[:cut] + junk + data[cut + len(junk) :])
    decode_only_schema_errors(data[:cut])
