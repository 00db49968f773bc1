"""What a node signs is checked first, and no job is stranded by a result it cannot publish.

Against a real nats-server, through the pipeline and the publisher: a runtime's values
outside the result schema, a result over the server's `max_payload`, and a results stream
that refuses every publish all end the job (terminated, one final error event) instead of
signing garbage or nak'ing the job forever.
"""

import dataclasses
from pathlib import Path

import pytest
from nats.aio.client import Client

from schemas.event import ErrorCode
from tests.support.jobnet import EchoRuntime, errors, job, publish_job, queue_empty, read_all
from tests.support.pipeline import SERVING, settings_for
from tests.support.polling import wait_for
from worker.core.errors import OutputMalformed
from worker.core.settings import Settings
from worker.core.signing import NodeKey
from worker.jobs.pipeline import Pipeline
from worker.jobs.provision import provision
from worker.jobs.publisher import Attestation, Publisher
from worker.runtime.api import Completion, WorkItem

pytestmark = pytest.mark.nats


class HostileRuntime(EchoRuntime):
    """Answers every job with a completion whose `fields` are overridden."""

    def __init__(self, **fields: object) -> None:
        super().__init__()
        self.fields = fields

    def answer(self, item: WorkItem) -> Completion:
        values: dict[str, object] = {
            "job_id": item.job_id,
            "text": "ok",
            "token_ids": [1, 2],
            "finish_reason": "length",
            "prompt_tokens": 3,
        }
        values.update(self.fields)
        return Completion(**values)  # type: ignore[arg-type]


async def stored_results(nc: Client, settings: Settings) -> list[bytes]:
    return await read_all(
        nc.jetstream(), settings.stream("RESULTS"), settings.subject("results", ">")
    )


async def run_one(
    nc: Client, settings: Settings, runtime: EchoRuntime, job_id: str, *, no_results: bool = False
) -> None:
    js = nc.jetstream()
    await provision(js, settings, ["demo"])
    if no_results:
        await js.delete_stream(settings.stream("RESULTS"))  # every result publish now fails
    await publish_job(js, settings, "demo", job(job_id), job_id)
    publisher = Publisher(nc, js, NodeKey.generate(), settings)
    async with Pipeline(nc, settings, publisher, runtime, SERVING):

        async def ended() -> bool:
            finals = [e for e in await errors(js, settings) if not e.retryable]
            return bool(finals) and await queue_empty(nc, settings)

        await wait_for(ended, timeout=30)


@pytest.mark.parametrize(
    "fields",
    [
        {"token_ids": [1, 1 << 31]},
        {"token_ids": [-1]},
        {"finish_reason": "exploded"},
        {"prompt_tokens": -5},
    ],
    ids=["token_id_2^31", "negative_token", "finish_reason", "negative_usage"],
)
async def test_values_outside_the_schema_are_never_signed(
    nc: Client, tmp_path: Path, fields: dict[str, object]
) -> None:
    settings = settings_for(tmp_path)
    await run_one(nc, settings, HostileRuntime(**fields), "hostile")
    (err,) = await errors(nc.jetstream(), settings)
    assert err.code == ErrorCode.OUTPUT_MALFORMED and not err.retryable
    assert err.job_id == "hostile" and err.network == settings.network
    assert await stored_results(nc, settings) == []


async def test_a_device_string_too_long_for_the_schema_is_never_signed(
    nc: Client, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    runtime = HostileRuntime()
    runtime._facts = dataclasses.replace(runtime._facts, device="x" * 10_000)
    await run_one(nc, settings, runtime, "long-device")
    (err,) = await errors(nc.jetstream(), settings)
    assert err.code == ErrorCode.OUTPUT_MALFORMED and not err.retryable
    assert await stored_results(nc, settings) == []


async def test_a_result_over_max_payload_ends_the_job_with_a_final_error(
    nc: Client, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    too_big = "x" * (nc.max_payload + 1)
    await run_one(nc, settings, HostileRuntime(text=too_big), "huge")
    (err,) = await errors(nc.jetstream(), settings)
    assert err.code == ErrorCode.OUTPUT_MALFORMED and not err.retryable
    assert "max_payload" in err.message
    assert await stored_results(nc, settings) == []


async def test_the_last_delivery_terminates_even_when_results_cannot_be_stored(
    nc: Client, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, max_deliver=2)
    await run_one(nc, settings, EchoRuntime(), "unstorable", no_results=True)
    finals = [e for e in await errors(nc.jetstream(), settings) if not e.retryable]
    assert [e.job_id for e in finals] == ["unstorable"]
    assert "last delivery" in finals[0].message


async def test_the_publisher_refuses_an_invalid_body_before_signing(
    nc: Client, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    publisher = Publisher(nc, nc.jetstream(), NodeKey.generate(), settings)
    with pytest.raises(OutputMalformed, match="token_ids"):
        publisher.seal_result(
            Attestation.of(
                {"id": "demo", "version": "1", "sha256": "a" * 64},
                {"image": "i", "engine": "e", "engine_version": "1", "device": "cpu"},
            ),
            {
                "job_id": "j",
                "config_version": 1,
                "input_sha256": "b" * 64,
                "output": {"text": "", "token_ids": [1 << 40], "finish_reason": "stop"},
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                "attempt": 1,
                "started_at": 1.0,
                "finished_at": 2.0,
            },
        )
