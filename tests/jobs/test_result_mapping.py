"""From a runtime's completion to the `ResultBody` the node signs, without a runtime or a
server (the frames themselves are parsed by `schemas.frames`, tested in test_frames.py)."""

from collections.abc import Coroutine
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas.codec import encode, validate
from schemas.envelope import EnvelopeType, unpack_envelope
from schemas.result import ResultBody
from tests.support.settings import make_settings
from worker.core.errors import OutputMalformed
from worker.core.signing import NodeKey, verify
from worker.jobs.intake import admit
from worker.jobs.pipeline import Pipeline, Serving
from worker.jobs.publisher import Attestation, Publisher
from worker.jobs.states import Malformed, Phase
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
    sealed = pipe._seal(record, done, 10.0, 11.0)
    assert sealed is not None and sealed.job_id == "j-1"
    signed = verify(sealed.envelope, expect=EnvelopeType.RESULT)
    assert signed.signer == key.node_id
    body = validate(ResultBody, signed.body)
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


ATTESTS = Attestation.of(
    {"id": "demo", "version": "1", "sha256": "a" * 64},
    {"image": "sha256:" + "1" * 64, "engine": "echo", "engine_version": "1", "device": "cpu"},
)


def output(**extra: Any) -> dict[str, Any]:
    return {"text": "héllo", "token_ids": [0, 5, 2**31 - 1], "finish_reason": "stop", **extra}


@pytest.mark.parametrize(
    ("out", "usage"),
    [
        (output(), {"prompt_tokens": 3, "completion_tokens": 3, "first_token_s": 0.5}),
        (output(), {"prompt_tokens": 0, "completion_tokens": 3, "first_token_s": 0}),
        (output(), {"prompt_tokens": 3, "completion_tokens": 3}),
        (
            output(
                logprobs=[
                    {"token_id": 0, "logprob": -0.5},
                    {"token_id": 5, "logprob": 0, "top": [[5, 0], [7, -1.5]]},
                    {"token_id": 2**31 - 1, "logprob": -2},
                ]
            ),
            {"prompt_tokens": 3, "completion_tokens": 3, "first_token_s": 1},
        ),
    ],
)
def test_a_sealed_result_is_the_schemas_own_encoding(out: Any, usage: Any) -> None:
    """The publisher packs the validated map, not a model dump: the signed bytes must be
    exactly what `encode(ResultBody)` gives for the same body (logprobs, whose entries the
    schema completes with defaults, take the dump)."""
    settings = make_settings()
    key = NodeKey.generate()
    publisher = Publisher(Client(), None, key, settings)  # type: ignore[arg-type]
    fields = {
        "job_id": "j-1",
        "config_version": 0,
        "input_sha256": "b" * 64,
        "output": out,
        "usage": usage,
        "attempt": 1,
        "started_at": 1700000000.25,
        "finished_at": 1700000001,
    }
    sealed = publisher.seal_result(ATTESTS, fields)
    body = validate(
        ResultBody,
        {
            **fields,
            "node_id": key.node_id,
            "network": settings.network,
            "model": ATTESTS.model,
            "runtime": ATTESTS.runtime,
        },
    )
    assert unpack_envelope(sealed.envelope).body == encode(body)
    assert verify(sealed.envelope).body["output"]["text"] == "héllo"


def test_the_fields_cannot_replace_the_nodes_identity_or_attestation() -> None:
    settings = make_settings()
    key = NodeKey.generate()
    publisher = Publisher(Client(), None, key, settings)  # type: ignore[arg-type]
    fields = {
        "job_id": "j-1",
        "node_id": "f" * 64,
        "network": "othernet",
        "model": {"id": "other", "version": "9", "sha256": "c" * 64},
        "config_version": 0,
        "input_sha256": "b" * 64,
        "output": output(),
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
        "attempt": 1,
        "started_at": 1.0,
        "finished_at": 2.0,
    }
    body = verify(publisher.seal_result(ATTESTS, fields).envelope).body
    assert (body["node_id"], body["network"]) == (key.node_id, settings.network)
    assert body["model"] == ATTESTS.wire[0]


async def test_a_failure_of_a_job_no_longer_in_flight_reports_nothing() -> None:
    """A job settled or handed back meanwhile (a late store failure, a drain) gets no error
    event from a failure that comes after; one in flight gets its event."""
    settings = make_settings()
    nc = Client()
    reported: list[str | None] = []

    class RecordingPublisher(Publisher):
        async def publish_error(self, code: Any, message: str, **kw: Any) -> None:
            reported.append(kw.get("job_id"))

    pipe = Pipeline(
        nc,
        settings,
        RecordingPublisher(nc, None, NodeKey.generate(), settings),  # type: ignore[arg-type]
        FixedRuntime(),
        Serving("demo", "1", "a" * 64, "sha256:" + "1" * 64, 7),
    )
    records = []
    for job_id in ("gone", "held"):
        job = {"job_id": job_id, "model_id": "demo", "prompt": "hello"}
        reply = "$JS.ACK.RST_JOBS.c.1.41.7.1700000000000000000.0"
        msg = Msg(nc, subject="rst.jobs.demo", reply=reply, data=msgpack.packb(job))
        records.append(admit(msg, model_id="demo", max_bytes=4096, now=0)[0])
    gone, held = records
    gone.phase = Phase.NAKED  # handed back (or settled) before the failure came
    held.phase = Phase.ANSWERED
    pipe._held.add(held)
    spawned: list[Coroutine[Any, Any, None]] = []
    pipe._spawn = lambda record, outcome: spawned.append(outcome)  # type: ignore[method-assign]
    pipe._apply(gone, Malformed(OutputMalformed("late")))
    pipe._apply(held, Malformed(OutputMalformed("now")))
    for outcome in spawned:
        await outcome
    assert reported == ["held"]
    assert pipe.in_flight == 0 and held.phase is Phase.TERMED  # `held` was terminated
