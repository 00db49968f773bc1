"""The runtime frame codec (`schemas.frames`): bounded decoding (frame bombs), kind and id
types, and one set of rules for a request on both sides of the pipe."""

import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import frames
from schemas.frames import FrameDecoder, FrameError
from schemas.job import Prompted
from schemas.limits import (
    LOGPROB_PAIR_BYTES,
    LOGPROB_TOKEN_BYTES,
    MAX_LOGPROB_BYTES,
    MAX_LOGPROBS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    check_output_fits,
)
from tests.support.payloads import json_schema_format, nested


def decode(value: Any, allowed: frozenset[str] = frames.TO_AGENT) -> list[frames.Frame]:
    return FrameDecoder(allowed).feed(msgpack.packb(value, use_bin_type=True))


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        {"t": ["ready"]},
        {"t": {"x": 1}},
        {"t": "pong", "id": [1]},
        {"t": "pong", "id": {"a": 1}},
        {"t": "done", "id": "1"},
        {"t": "done", "id": 1.5},
    ],
    ids=["t-list", "t-map", "id-list", "id-map", "id-str", "id-float"],
)
def test_kind_or_id_of_the_wrong_type_is_a_frame_error(value: Any) -> None:
    with pytest.raises(FrameError):
        decode(value)


@pytest.mark.parametrize(
    "value",
    [
        {"t": "pong", "id": 1, "x": nested_lists(frames.MAX_DEPTH)},
        {"t": "done", "id": 1, "token_ids": list(range(frames.MAX_ARRAY_LEN + 1))},
        {"t": "done", "id": 1, **{f"k{i}": i for i in range(frames.MAX_MAP_LEN)}},
        {"t": "done", "id": 1, "blob": b"\0" * (frames.MAX_BIN_LEN + 1)},
    ],
    ids=["nested", "long-array", "wide-map", "big-bin"],
)
def test_frame_bombs_are_refused(value: Any) -> None:
    with pytest.raises(FrameError):
        decode(value)


def test_default_frame_size_fits_a_real_result_and_no_more() -> None:
    done = frames.done(
        1,
        token_ids=list(range(100_000)),
        text="word " * 100_000,
        finish_reason="length",
        prompt_tokens=10,
        first_token_s=0.1,
    )
    assert len(frames.pack(done)) < frames.MAX_FRAME_BYTES <= 8 << 20
    with pytest.raises(FrameError, match="larger than"):
        FrameDecoder(frames.TO_AGENT).feed(frames.pack({"t": "fatal", "message": "x" * (9 << 20)}))


def fed_in_pieces(data: bytes, piece: int = 64 << 10) -> list[frames.Frame]:
    decoder = FrameDecoder(frames.TO_AGENT)
    out: list[frames.Frame] = []
    for start in range(0, len(data), piece):
        out += decoder.feed(data[start : start + piece])
    return out


def test_a_frame_is_bounded_by_its_bytes_however_they_are_spread() -> None:
    """The limit bounded one string, not one frame: 24 MiB over 24 strings passed."""
    spread = msgpack.packb({"t": "done", "a": ["x" * (1 << 20)] * 24})
    with pytest.raises(FrameError, match="larger than"):
        fed_in_pieces(spread)
    just_under = msgpack.packb({"t": "fatal", "message": ["x" * (1 << 20)] * 7})
    assert len(just_under) < frames.MAX_FRAME_BYTES
    assert fed_in_pieces(just_under)[0]["t"] == "fatal"


@pytest.mark.parametrize("empty", [[], {}], ids=["lists", "maps"])
def test_a_frame_of_many_tiny_values_is_refused_at_a_bounded_cost(empty: Any) -> None:
    """8 MiB of empty lists (one byte each) decoded to +559 MiB and held the loop for
    seconds; the decoder now stops after `MAX_FRAME_OBJECTS` values."""
    bomb = msgpack.packb({"t": "done", "a": [[empty] * 100_000 for _ in range(80)]})
    assert len(bomb) < frames.MAX_FRAME_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="values"):
            fed_in_pieces(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 96 << 20


@pytest.mark.parametrize("bad", ["values", "utf-8"])
def test_a_large_bad_frame_after_a_good_one_is_a_frame_error(bad: str) -> None:
    """A frame large enough to be counted, refused after a good frame of the same read,
    raised BufferError (the refused frame's view of the buffer outlived the decode), which
    the runtime's reader takes for a bug of its own rather than a runtime's bad frame."""
    if bad == "values":
        frame = msgpack.packb({"t": "done", "a": [[0] * 1000 for _ in range(600)]})
    else:
        frame = msgpack.packb({"t": "done", "a": "a" * 600_000}).replace(b"aaaa", b"\xff" * 4, 1)
    assert len(frame) > frames.MAX_FRAME_OBJECTS  # the counted path
    with pytest.raises(FrameError):
        FrameDecoder(frames.TO_AGENT).feed(msgpack.packb({"t": "pong", "id": 1}) + frame)


def test_the_largest_output_a_job_may_ask_for_decodes() -> None:
    """The object bound leaves room for a `done` with the most logprobs a job may ask for."""
    per_token = LOGPROB_TOKEN_BYTES + (MAX_LOGPROBS + 1) * LOGPROB_PAIR_BYTES
    tokens = MAX_LOGPROB_BYTES // per_token
    check_output_fits(tokens, MAX_LOGPROBS)
    top = [[7, -0.5]] * (MAX_LOGPROBS + 1)
    logprobs: list[frames.TokenLogprob] = [
        {"token_id": 7, "logprob": -0.5, "top": top} for _ in range(tokens)
    ]
    done = frames.done(
        1,
        token_ids=[7] * tokens,
        text="w " * tokens,
        finish_reason="length",
        prompt_tokens=1,
        first_token_s=0.0,
        logprobs=logprobs,
    )
    (decoded,) = fed_in_pieces(frames.pack(done))
    assert len(frames.parse_done(decoded)["logprobs"]) == tokens


def test_constructors_round_trip_through_the_parsers() -> None:
    request: frames.RequestItem = {"prompt": "hi", "params": {"max_tokens": 3, "stop": ["."]}}
    submit = frames.submit(7, request, stream=True, deadline=123.0)
    (decoded,) = decode(submit, frames.TO_RUNTIME)
    assert frames.parse_submit(decoded) == submit
    assert frames.parse_request_item(decoded["request"]) == request
    ready = frames.ready(
        engine="e", engine_version="1", model_sha256="", device="cpu", max_active=4
    )
    assert frames.parse_ready(decode(ready)[0]) == ready
    logprobs: list[frames.TokenLogprob] = [{"token_id": 1, "logprob": -0.1, "top": [[1, -0.1]]}]
    done = frames.done(
        7,
        token_ids=[1],
        text="a",
        finish_reason="stop",
        prompt_tokens=2,
        first_token_s=0.5,
        logprobs=logprobs,
    )
    assert frames.parse_done(decode(done)[0]) == done
    failed = frames.failed(7, frames.FailCode.ENGINE, "boom")
    assert frames.parse_failed(decode(failed)[0]) == failed
    partial = frames.partial(7, [1, 2], "ab")
    assert frames.parse_partial(decode(partial)[0]) == partial


def deepest_schema() -> dict[str, Any]:
    """A schema as deep as the job schema allows: maps `MAX_SCHEMA_DEPTH` levels down."""
    value: dict[str, Any] = {}
    for _ in range(MAX_SCHEMA_DEPTH):
        value = {"a": value}
    return value


def widest_schema() -> dict[str, Any]:
    """A schema whose `properties` map is far longer than any frame map of the protocol."""
    props = {f"p{i}": {"type": "integer"} for i in range(600)}
    return {"type": "object", "properties": props}


@pytest.mark.parametrize("schema", [deepest_schema(), widest_schema()], ids=["deep", "wide"])
def test_a_submit_with_any_schema_the_job_allows_decodes(schema: dict[str, Any]) -> None:
    """The decoder's bombs bounds leave room for every schema that `schemas.job` accepts: a
    valid job never breaks the frame stream."""
    request = {"prompt": "x", "params": {"response_format": json_schema_format(schema)}}
    Prompted.model_validate(request)
    (decoded,) = decode(frames.submit(1, request), frames.TO_RUNTIME)  # type: ignore[arg-type]
    assert frames.parse_request_item(decoded["request"]) == request


def test_a_too_deep_schema_fails_its_request_and_other_depth_bombs_the_stream() -> None:
    request = {"prompt": "x", "params": {"response_format": json_schema_format(nested(40))}}
    (decoded,) = decode(frames.submit(1, request), frames.TO_RUNTIME)  # type: ignore[arg-type]
    with pytest.raises(FrameError, match="nested deeper"):
        frames.parse_request_item(decoded["request"])
    bomb = {**request, "prompt": nested_lists(frames.MAX_DEPTH)}
    with pytest.raises(FrameError, match="nested deeper"):
        decode(frames.submit(1, bomb), frames.TO_RUNTIME)  # type: ignore[arg-type]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"prompt": "x", "messages": CHAT}, "exactly one"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 1}]}, "content"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "unknown keys"),
        ({"messages": [{"role": "user", "content": "x" * (1 << 17)}] * 3}, "characters"),
        ({"params": {"logprobs": 21}}, "logprobs"),
        ({"params": {"logprobs": True}}, "logprobs"),
        ({"params": {"presence_penalty": 2.5}}, "presence_penalty"),
        ({"params": {"frequency_penalty": "1"}}, "frequency_penalty"),
        ({"params": {"ignore_eos": True}}, "unknown keys"),
        ({"params": {"response_format": "json_object"}}, "response_format"),
        ({"params": {"response_format": {"type": "text"}}}, "response_format"),
        ({"params": {"response_format": {"type": "json_object", "schema": {}}}}, "unknown"),
        ({"params": {"response_format": {"type": "json_schema"}}}, "json_schema"),
        ({"params": {"response_format": json_schema_format([])}}, "schema"),
        ({"params": {"response_format": json_schema_format({"a": b"x"})}}, "JSON cannot"),
        ({"params": {"response_format": json_schema_format({"a": "x" * 16384})}}, "16384"),
        ({"params": {"response_format": json_schema_format(nested(33))}}, "nested deeper"),
        ({"params": {"response_format": json_schema_format({}, name="a b")}}, "name"),
        ({"params": {"response_format": json_schema_format({}, strict=1)}}, "strict"),
        ({"params": {"response_format": json_schema_format({}, extra=1)}}, "unknown keys"),
    ],
)
def test_bad_items_are_frame_errors_and_job_schema_errors(
    item: dict[str, Any], reason: str
) -> None:
    item = item if "messages" in item else {"prompt": "x", **item}
    with pytest.raises(FrameError, match=reason):
        frames.parse_request_item(item)
    with pytest.raises(ValidationError):
        Prompted.model_validate(item)


edge_ints = st.sampled_from([-2, -1, 0, 1, 16, (1 << 20), (1 << 20) + 1, (1 << 31), (1 << 63)])
edge_numbers = edge_ints | st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, -0.1, True])
params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": edge_ints,
        "temperature": edge_numbers,
        "top_p": edge_numbers,
        "top_k": edge_ints,
        "seed": edge_ints,
        "stop": st.lists(st.sampled_from(["", "x", "y" * 257]), max_size=17),
        "logprobs": edge_ints | st.sampled_from([20, 21, 1.0]),
        "presence_penalty": edge_numbers | st.sampled_from([-2, -2.01, None]),
        "frequency_penalty": edge_numbers | st.sampled_from([-2.0, 3]),
        "response_format": st.sampled_from(
            [
                None,
                "json_object",
                {"type": "json_object"},
                {"type": "text"},
                {"type": "json_object", "json_schema": None},
                {"type": "json_schema"},
                {"type": "json_schema", "json_schema": None},
                json_schema_format({"type": "object"}),
                json_schema_format({"type": "object"}, strict=True, description="d"),
                json_schema_format({"type": "object"}, strict=None, description=None),
                json_schema_format({}, strict="yes"),
                json_schema_format({}, description="d" * 1025),
                json_schema_format({}, name=""),
                json_schema_format({}, name="x" * 65),
                json_schema_format({}, name="a\n"),
                json_schema_format([]),
                json_schema_format({1: "a"}),
                json_schema_format({"n": float("nan")}),
                json_schema_format({"n": 1.5, "b": None, "l": [True, "s"]}),
                json_schema_format(nested(15)),
                json_schema_format(nested(16)),
                json_schema_format({"a": "x" * (MAX_SCHEMA_BYTES - 20)}),
                json_schema_format({"a": "x" * MAX_SCHEMA_BYTES}),
                {"type": "json_schema", "json_schema": {"schema": {}}},
            ]
        ),
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", 1]),
            "content": st.sampled_from(["", "hi", 3, "x" * (100 * 1024)]),
        },
        optional={"name": st.just("n")},
    ),
    max_size=4,
)
items = st.fixed_dictionaries(
    {"params": params},
    optional={
        "prompt": st.sampled_from(["", "hi", "x" * (256 * 1024 + 1)]),
        "prompt_token_ids": st.lists(edge_ints, max_size=3),
        "messages": messages,
    },
)


@settings(max_examples=600, deadline=None)
@given(item=items)
def test_runtime_and_job_schema_accept_the_same_requests(item: dict[str, Any]) -> None:
    try:
        Prompted.model_validate(item)
        schema_ok = True
    except ValidationError:
        schema_ok = False
    try:
        frames.parse_request_item(item)
        runtime_ok = True
    except FrameError:
        runtime_ok = False
    assert schema_ok == runtime_ok, item


def test_a_pong_carries_bounded_engine_stats() -> None:
    stats: frames.EngineStats = {
        "running": 3,
        "waiting": 2,
        "kv_cache_usage": 0.25,
        "prefix_cache_queries": 1000,
        "prefix_cache_hits": 400,
    }
    (decoded,) = decode(frames.pong(9, stats))
    assert frames.parse_pong(decoded) == frames.pong(9, stats)
    (bare,) = decode(frames.pong(9))
    assert frames.parse_pong(bare) == {"t": "pong", "id": 9}, "stats are optional"


@pytest.mark.parametrize(
    "stats",
    [
        {"running": -1},
        {"waiting": 1.5},
        {"kv_cache_usage": 1.5},
        {"kv_cache_usage": "full"},
        {"prefix_cache_hits": -3},
        {"gpu": 1},
        [1, 2],
    ],
    ids=["negative", "float-count", "over-one", "str", "negative-hits", "unknown-key", "list"],
)
def test_a_pong_with_stats_out_of_bounds_is_a_frame_error(stats: Any) -> None:
    (decoded,) = decode({"t": "pong", "id": 1, "stats": stats})
    with pytest.raises(FrameError, match="pong.stats"):
        frames.parse_pong(decoded)


@pytest.mark.parametrize(
    "given",
    [
        {"prompt": "hi", "params": {"max_tokens": 4, "seed": 1}},
        {"prompt_token_ids": [1, 2, 3]},
        {
            "messages": [{"role": "user", "content": "hi"}],
            "params": {"logprobs": 2, "response_format": json_schema_format({"type": "object"})},
        },
    ],
    ids=["prompt", "token_ids", "messages"],
)
def test_a_jobs_request_item_is_built_once_and_parses_as_itself(given: dict[str, Any]) -> None:
    """The typed request the agent sends is what the runtime's parser makes of it."""
    item = Prompted.model_validate(given).request_item()
    assert frames.parse_request_item(item) == item
    assert set(item) == set(given) | {"params"} and None not in item["params"].values()
