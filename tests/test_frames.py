"""The runtime frame codec (`schemas.frames`): bounded decoding (frame bombs), kind and id
types, and one set of rules for a request on both sides of the pipe."""

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import frames
from schemas.frames import FrameDecoder, FrameError
from schemas.job import Prompted


def decode(value: Any, allowed: frozenset[str] = frames.TO_AGENT) -> list[frames.Frame]:
    return FrameDecoder(allowed).feed(msgpack.packb(value, use_bin_type=True))


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
        {"t": "pong", "id": 1, "x": [[[[[[[[[1]]]]]]]]]},
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
    },
)
items = st.fixed_dictionaries(
    {"params": params},
    optional={
        "prompt": st.sampled_from(["", "hi", "x" * (256 * 1024 + 1)]),
        "prompt_token_ids": st.lists(edge_ints, max_size=3),
    },
)


@settings(max_examples=300, deadline=None)
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
