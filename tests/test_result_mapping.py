"""From a runtime's `result` frame to outcomes, and from a completion to a `ResultBody`,
without a runtime or a server."""

from typing import Any

import msgpack
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import frames
from schemas.codec import validate
from schemas.result import ResultBody
from tests.support.settings import make_settings
from worker.core.errors import ItemFailed, OutputMalformed
from worker.core.signing import NodeKey
from worker.jobs.intake import admit
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, RuntimeFacts, WorkItem
from worker.runtime.supervisor import map_result

ITEMS = [WorkItem("a", {"prompt": "x"}), WorkItem("b", {"prompt": "y"})]


def ok(job_id: str, **over: Any) -> dict[str, Any]:
    return {
        **frames.ok(job_id, text="hi", token_ids=[1, 2], finish_reason="stop", prompt_tokens=3),
        **over,
    }


def test_each_item_gets_its_own_outcome_in_item_order() -> None:
    out = map_result(ITEMS, frames.result(1, [ok("b"), frames.failed("a", "boom")]))
    assert isinstance(out[0], ItemFailed) and "boom" in str(out[0])
    assert out[1] == Completion("b", "hi", [1, 2], "stop", 3)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        (ok("a", text=5), "'text' is not a string"),
        (ok("a", token_ids=[1, -1]), "'token_ids'"),
        (ok("a", token_ids=[True]), "'token_ids'"),
        (ok("a", finish_reason="tired"), "'finish_reason' is 'tired'"),
        (ok("a", prompt_tokens=-1), "'prompt_tokens' is -1"),
        ({"job_id": "a", "error": 7}, "'error' is not a string"),
    ],
    ids=["text", "negative_token", "bool_token", "finish_reason", "prompt_tokens", "error_type"],
)
def test_a_malformed_entry_is_output_malformed_for_that_job_only(
    entry: dict[str, Any], says: str
) -> None:
    out = map_result(ITEMS, frames.result(1, [entry, ok("b")]))
    assert isinstance(out[0], OutputMalformed) and says in str(out[0])
    assert isinstance(out[1], Completion)


def test_missing_duplicated_and_stray_entries() -> None:
    out = map_result(ITEMS, frames.result(1, [ok("a"), ok("a"), ok("zzz")]))
    assert isinstance(out[0], OutputMalformed) and "two outcomes" in str(out[0])
    assert isinstance(out[1], OutputMalformed) and "no outcome" in str(out[1])


def test_a_result_without_item_list_fails_every_job_retryably() -> None:
    out = map_result(ITEMS, {"t": "result", "id": 1, "items": "nope"})
    assert all(isinstance(o, OutputMalformed) and o.retryable for o in out)


class FixedRuntime:
    facts = RuntimeFacts("echo", "1.0", "a" * 64, "cpu", "sha256:" + "1" * 64)

    async def run(self, items: list[WorkItem]) -> list[Any]:
        raise AssertionError("not called")


def test_a_completion_maps_to_a_valid_result_body() -> None:
    settings = make_settings()
    key = NodeKey.generate()
    nc = Client()
    js: Any = None  # never published to
    serving = Serving("demo", "1", "a" * 64, "sha256:" + "1" * 64, 7)
    pipe = Pipeline(nc, settings, Publisher(nc, js, key, settings), FixedRuntime(), serving)
    reply = "$JS.ACK.RST_JOBS.c.2.41.7.1700000000000000000.0"
    job = {"job_id": "j-1", "model_id": "demo", "prompt": "hello"}
    msg = Msg(nc, subject="rst.jobs.demo", reply=reply, data=msgpack.packb(job))
    record, rejected = admit(msg, model_id="demo", max_bytes=4096, now=0)
    assert rejected is None
    done = Completion("j-1", "hi", [5, 6, 7], "length", 2)
    body = validate(ResultBody, pipe._result_body(record, done, 10.0, 11.0))
    assert body.job_id == "j-1" and body.node_id == key.node_id
    assert (body.model.id, body.model.sha256, body.config_version) == ("demo", "a" * 64, 7)
    assert (body.runtime.engine, body.runtime.image) == ("echo", serving.image)
    assert (body.output.text, body.output.token_ids, body.output.finish_reason) == (
        "hi",
        [5, 6, 7],
        "length",
    )
    assert (body.usage.prompt_tokens, body.usage.completion_tokens) == (2, 3)
    assert (body.attempt, body.input_sha256) == (2, record.input_sha256)
