"""From a runtime's completion to the `ResultBody` the node signs, without a runtime or a
server (the frames themselves are parsed by `schemas.frames`, tested in test_frames.py)."""

from typing import Any

import msgpack
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import validate
from schemas.result import ResultBody
from tests.support.settings import make_settings
from worker.core.signing import NodeKey
from worker.jobs.intake import admit
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.publisher import Publisher
from worker.runtime.api import Completion, RuntimeFacts


class FixedRuntime:
    facts = RuntimeFacts("echo", "1.0", "a" * 64, "cpu", "sha256:" + "1" * 64)

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    def submit(self, *args: Any, **kwargs: Any) -> Any:
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
    done = Completion("j-1", "hi", [5, 6, 7], "length", 2, first_token_s=0.25)
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
    assert body.usage.first_token_s == 0.25 and body.output.logprobs is None
    assert body.network == settings.network
    assert (body.attempt, body.input_sha256) == (2, record.input_sha256)
